import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Mlp as TimmMlp
from timm.models.vision_transformer import PatchEmbed as TimmPatchEmbed

from speedpipe.models.dit import DiT, DiT_models, TimestepEmbedder, get_2d_sincos_pos_embed, load_dit_state_dict


class OfficialDiT(nn.Module):
    """The forward pass of facebookresearch/DiT models.py, built from timm's layers as the original is.

    Used as the oracle: speedpipe's DiT must load its state_dict and give the same outputs.
    """

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes):
        super().__init__()
        self.out_channels, self.p = in_channels * 2, patch_size
        self.x_embedder = TimmPatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            b.attn = TimmAttention(hidden_size, num_heads=num_heads, qkv_bias=True)
            b.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            b.mlp = TimmMlp(hidden_size, 4 * hidden_size, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
            b.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
            self.blocks.append(b)
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, t, y):
        mod = lambda x, shift, scale: x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # noqa: E731
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)) + self.y_embedder.embedding_table(y)
        x = self.x_embedder(x) + self.pos_embed
        for b in self.blocks:
            s1, sc1, g1, s2, sc2, g2 = b.adaLN_modulation(c).chunk(6, dim=1)
            x = x + g1.unsqueeze(1) * b.attn(mod(b.norm1(x), s1, sc1))
            x = x + g2.unsqueeze(1) * b.mlp(mod(b.norm2(x), s2, sc2))
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(mod(self.final_layer.norm_final(x), shift, scale))
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, h * self.p, w * self.p)


def _randomize(model, seed=0):
    """Non-zero weights everywhere (the adaLN-Zero init would make every output zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_dit_xl2_state_dict_matches_official_table():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 12 + 10 * 28
    expected = {
        "x_embedder.proj.weight": (1152, 4, 2, 2), "x_embedder.proj.bias": (1152,),
        "pos_embed": (1, 256, 1152),
        "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152), "blocks.27.attn.qkv.bias": (3456,),
        "blocks.0.attn.proj.weight": (1152, 1152), "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608), "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.linear.weight": (32, 1152), "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key


def test_forward_matches_official_architecture():
    torch.manual_seed(0)
    ours = _randomize(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10))
    official = OfficialDiT(8, 2, 4, 64, 2, 4, 10)
    official.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), official.eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    assert torch.allclose(ours(x, t, y), official(x, t, y), atol=1e-5)


def test_initialisation_is_adaln_zero():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 8, 8, 8) and torch.all(out == 0)
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(64, 4)).float())


def test_timestep_embedding_is_cos_then_sin():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.5]), 256)
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    assert emb[1, 0] == pytest.approx(math.cos(3.5), abs=1e-6)  # fractional t is embedded, not rounded


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    model = _randomize(DiT_models["DiT-T/2"](input_size=8, num_classes=10)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])
    fused = model(x, t, y)
    model.set_fused_attn(False)
    assert torch.allclose(fused, model(x, t, y), atol=1e-5)


@pytest.mark.parametrize("wrap", ["bare", "ema"])
def test_state_dict_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    model = _randomize(DiT_models["DiT-T/2"](input_size=8, num_classes=10)).eval()
    state = model.state_dict()
    torch.save(state if wrap == "bare" else {"ema": state, "model": {}}, tmp_path / "w.pt")
    loaded = load_dit_state_dict(DiT_models["DiT-T/2"](input_size=8, num_classes=10), tmp_path / "w.pt").eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])
    assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_loading_a_mismatched_checkpoint_names_the_file(tmp_path):
    torch.save(DiT_models["DiT-T/4"](input_size=8, num_classes=10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_dit_state_dict(DiT_models["DiT-T/2"](input_size=8, num_classes=10), tmp_path / "other.pt")


def test_model_zoo_sizes():
    assert {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL", "T") for p in (2, 4, 8)} == set(DiT_models)
    with torch.device("meta"):
        s2 = DiT_models["DiT-S/2"]()
    assert sum(p.numel() for p in s2.parameters()) == pytest.approx(33e6, rel=0.05)
    assert np.isfinite(get_2d_sincos_pos_embed(16, 2)).all()


def test_forward_macs_matches_the_dit_paper():
    from speedpipe.models.dit import forward_macs

    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"](input_size=32)
        s = DiT_models["DiT-S/2"](input_size=32)
    assert forward_macs(xl) / 1e9 == pytest.approx(118.6, rel=0.01)
    assert forward_macs(s) / 1e9 == pytest.approx(6.06, rel=0.02)
