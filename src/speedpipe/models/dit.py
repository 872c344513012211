"""DiT: Diffusion Transformer (Peebles & Xie, 2023), state_dict-compatible with facebookresearch/DiT.

Parameter names and shapes match the official checkpoints (x_embedder.proj, pos_embed, t_embedder.mlp.0/2,
y_embedder.embedding_table, blocks.N.attn.qkv/proj, blocks.N.mlp.fc1/fc2, blocks.N.adaLN_modulation.1,
final_layer.linear, final_layer.adaLN_modulation.1), so published weights load unchanged.
Attention goes through F.scaled_dot_product_attention (fused kernels) unless `fused_attn=False`,
which selects the explicit softmax(QK^T/sqrt(d))V path (what the original timm block computes).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from speedpipe.io import safe_torch_load


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image [N, C, H, W] -> tokens [N, (H/p)*(W/p), D] with a strided convolution."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, qkv):
        """[B, N, 3C] -> q, k, v, each [B, heads, N, head_dim]."""
        B, N, _ = qkv.shape
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q, k, v):
        """softmax(q kᵀ/√d) v: the fused kernel, or the explicit product with fused_attn off."""
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v)
        return ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v

    def forward(self, x):
        B, N, C = x.shape
        x = self.attend(*self.split_heads(self.qkv(x)))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> vectors: sinusoidal cat(cos, sin) features, then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def frequencies(t, dim, max_period=10000):
        """The dim // 2 angular frequencies ω of the embedding, in t's precision (float64 only for exactness tests)."""
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        freqs = TimestepEmbedder.frequencies(t, dim, max_period)
        args = t[:, None].to(freqs.dtype) * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; the extra row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: shift/scale/gate for attention, then for the MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        fused_attn=True,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed 2-D sin-cos positional embedding, stored as a (frozen) parameter as in the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, fused_attn=fused_attn) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid_size = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        # Patch embedding initialised like nn.Linear (not nn.Conv2d).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def set_fused_attn(self, enabled: bool):
        for block in self.blocks:
            block.attn.fused_attn = enabled

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def add_interval_embedding(self):
        """A second time input (MeanFlow's interval t − r): an embedder like t's whose output layer starts at zero, so
        the net computes what it computed before until it is trained. Idempotent."""
        if getattr(self, "interval_embedder", None) is None:
            hidden = self.t_embedder.mlp[2].out_features
            self.interval_embedder = TimestepEmbedder(hidden).to(self.t_embedder.mlp[0].weight)
            nn.init.normal_(self.interval_embedder.mlp[0].weight, std=0.02)
            nn.init.constant_(self.interval_embedder.mlp[2].weight, 0)
            nn.init.constant_(self.interval_embedder.mlp[2].bias, 0)
        return self

    def forward(self, x, t, y, force_drop_ids=None):
        """x: [N, C, H, W] latents, t: [N] (float or integer) timesteps, y: [N] labels."""
        return self.forward_conditioned(x, self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids))

    def forward_conditioned(self, x, c):
        """The net on the conditioning vector c (the sum of its input embeddings: time, label, interval)."""
        x = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """MAE's 2-D sin-cos embedding: [grid_size*grid_size, embed_dim], half the channels for each axis."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# Model sizes of the DiT paper, plus a tiny "T" size for CPU demos.
DIT_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "T": dict(depth=6, hidden_size=128, num_heads=4),
}


def _dit_factory(size, patch_size):
    def make(**kwargs):
        return DiT(patch_size=patch_size, **DIT_SIZES[size], **kwargs)

    make.__name__ = f"DiT_{size}_{patch_size}"
    return make


DiT_models = {f"DiT-{size}/{p}": _dit_factory(size, p) for size in DIT_SIZES for p in (2, 4, 8)}


def load_dit_state_dict(model: DiT, path):
    """Load official or speedpipe weights: a bare state_dict, or one under "ema" / "model"."""
    state = safe_torch_load(path)
    if isinstance(state, dict) and "ema" in state:
        state = state["ema"]
    elif isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: not a DiT checkpoint of this configuration: {err}") from None
    return model


def build_model(cfg, initialise: bool = True) -> DiT:
    """The DiT of a config's `model` section (learn_sigma from `diffusion`), loaded from model.init_from when set and
    `initialise` (a caller about to load a checkpoint's weights needs neither the initial weights nor their file)."""
    m = cfg.model
    model = DiT_models[m.name](input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                               class_dropout_prob=m.class_dropout_prob, learn_sigma=cfg.diffusion.learn_sigma,
                               fused_attn=m.fused_attn)
    if initialise and m.init_from:
        load_dit_state_dict(model, m.init_from)
    return model


def forward_macs(model: DiT) -> int:
    """Multiply-accumulates of one forward pass per image (the DiT paper's "Gflops": 118.6e9 for XL/2 at 256²).

    Counts the linear layers, the patch embedding and the two attention products; FLOPs ≈ 2 × MACs.
    """
    n = model.x_embedder.num_patches
    d = model.pos_embed.shape[-1]
    p, c_in = model.patch_size, model.in_channels
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = n * (3 * d * d + d * d + 2 * d * mlp_hidden) + 2 * n * n * d + 6 * d * d
    embed = n * p * p * c_in * d + 256 * d + d * d
    final = n * d * p * p * model.out_channels + 2 * d * d
    return len(model.blocks) * per_block + embed + final
