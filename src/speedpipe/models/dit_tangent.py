"""A DiT's forward pass with its forward-mode derivative written by hand: (net(x, t, y), d net along (dx, dt)).

sCD needs F_θ with gradients and its time derivative along the ODE (a JVP) at the same point. Autograd's forward
mode (torch.func.jvp) recomputes the primal, cannot go through the fused attention kernels (so it runs the math
kernel) and, with gradients on, records the tangent's graph too. Here the primal is the net's own forward, with
gradients, through the same modules and kernels (fused attention included), and beside each operation its
derivative is propagated without gradients, reusing the primal's values:

    linear / patch conv   d(Wu + b) = W du
    LayerNorm (no affine) n = (u − μ)/s:  dn = (du − mean(du) − n·mean(n·du)) / s,   s = √(var(u) + ε)
    modulate              d(n(1 + a) + b) = dn(1 + a) + n·da + db
    SiLU                  d silu(u) = σ(u)(1 + u(1 − σ(u)))·du
    GELU (tanh)           g = ½u(1 + th), th = tanh(k(u + c u³)):  dg = [½(1 + th) + ½u(1 − th²)k(1 + 3c u²)]·du
    sinusoidal embedding  d[cos ωt, sin ωt] = [−ω sin ωt, ω cos ωt]·dt
    attention             O = P v, P = softmax(S), S = q kᵀ/√d:  dS = (dq kᵀ + q dkᵀ)/√d,
                          dO = (P ⊙ (dS − Σ_j P⊙dS)) v + P dv     (P recomputed, no gradients)

The label embedding and the positional embedding are constants (zero tangent).
"""

import torch
import torch.nn.functional as F

from speedpipe.models.dit import DiT, DiTBlock, modulate


# SiLU and GELU have diagonal Jacobians, LayerNorm (no affine) and softmax symmetric ones: for them the VJP kernels
# autograd uses are also the JVPs (one fused kernel each instead of a chain of elementwise operations). These kernels
# take the tangent in the primal's dtype (under bf16 autocast a linear layer's tangent is bf16, its input fp32).
def _silu_tangent(u, du):
    return torch.ops.aten.silu_backward(du.to(u.dtype), u)


def _gelu_tanh_tangent(u, du):
    return torch.ops.aten.gelu_backward(du.to(u.dtype), u, approximate="tanh")


def _layer_norm(norm, u):
    """norm(u) with the mean and 1/s the tangent reuses."""
    return torch.ops.aten.native_layer_norm(u, norm.normalized_shape, None, None, norm.eps)


def _layer_norm_tangent(norm, u, mean, rstd, du):
    return torch.ops.aten.native_layer_norm_backward(du.to(u.dtype), u, norm.normalized_shape, mean, rstd, None, None,
                                                     [True, False, False])[0]


def _linear_tangent(linear, du):
    return F.linear(du, linear.weight)


def _attention_tangent(q, k, v, dq, dk, dv):
    scale = q.shape[-1] ** -0.5
    p = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    return torch.ops.aten._softmax_backward_data(ds.to(p.dtype), p, -1, p.dtype) @ v + p @ dv


def time_embedding_with_tangent(embedder, t, dt):
    """The DiT time embedding (the ops of embedder(t)) and its derivative along dt."""
    dim = embedder.frequency_embedding_size
    lin1, silu, lin2 = embedder.mlp
    t_freq = embedder.timestep_embedding(t, dim)
    u = lin1(t_freq.to(lin1.weight.dtype))
    emb = lin2(silu(u))
    with torch.no_grad():
        freqs = embedder.frequencies(t, dim)
        cos, sin = t_freq[:, : len(freqs)], t_freq[:, len(freqs) : 2 * len(freqs)]
        d_freq = F.pad(torch.cat([-sin * freqs, cos * freqs], dim=-1) * dt[:, None].to(freqs.dtype), (0, dim % 2))
        d_emb = _linear_tangent(lin2, _silu_tangent(u, _linear_tangent(lin1, d_freq.to(lin1.weight.dtype))))
    return emb, d_emb


def _adaln_tangent(modulation, c, dc, chunks):
    out = modulation(c).chunk(chunks, dim=1)
    with torch.no_grad():
        d_out = _linear_tangent(modulation[1], _silu_tangent(c, dc)).chunk(chunks, dim=1)
    return out, d_out


def _modulated_norm(norm, x, dx, shift, scale, d_shift, d_scale):
    n, mean, rstd = _layer_norm(norm, x)
    m = modulate(n, shift, scale)
    with torch.no_grad():
        dn = _layer_norm_tangent(norm, x, mean, rstd, dx)
        dm = dn * (1 + scale.unsqueeze(1)) + n * d_scale.unsqueeze(1) + d_shift.unsqueeze(1)
    return m, dm


def _block_tangent(block: DiTBlock, x, dx, c, dc):
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), d = _adaln_tangent(block.adaLN_modulation, c, dc, 6)
    d_shift_msa, d_scale_msa, d_gate_msa, d_shift_mlp, d_scale_mlp, d_gate_mlp = d

    attn = block.attn
    m, dm = _modulated_norm(block.norm1, x, dx, shift_msa, scale_msa, d_shift_msa, d_scale_msa)
    B, N, C = m.shape
    q, k, v = attn.split_heads(attn.qkv(m))
    a = attn.proj(attn.attend(q, k, v).transpose(1, 2).reshape(B, N, C))
    with torch.no_grad():
        do = _attention_tangent(q, k, v, *attn.split_heads(_linear_tangent(attn.qkv, dm)))
        da = _linear_tangent(attn.proj, do.transpose(1, 2).reshape(B, N, C))
        dx = dx + d_gate_msa.unsqueeze(1) * a + gate_msa.unsqueeze(1) * da
    x = x + gate_msa.unsqueeze(1) * a

    mlp = block.mlp
    m, dm = _modulated_norm(block.norm2, x, dx, shift_mlp, scale_mlp, d_shift_mlp, d_scale_mlp)
    u = mlp.fc1(m)
    h = mlp.fc2(mlp.act(u))
    with torch.no_grad():
        dh = _linear_tangent(mlp.fc2, _gelu_tanh_tangent(u, _linear_tangent(mlp.fc1, dm)))
        dx = dx + d_gate_mlp.unsqueeze(1) * h + gate_mlp.unsqueeze(1) * dh
    return x + gate_mlp.unsqueeze(1) * h, dx


def forward_with_tangent(net: DiT, x, dx, t, dt, y):
    """(net(x, t, y) with gradients, its derivative along (dx, dt) without): the same value as net(x, t, y)."""
    t_emb, dc = time_embedding_with_tangent(net.t_embedder, t, dt)
    return conditioned_with_tangent(net, x, dx, t_emb + net.y_embedder(y, net.training), dc)


def conditioned_with_tangent(net: DiT, x, dx, c, dc):
    """(net.forward_conditioned(x, c) with gradients, its derivative along (dx, dc) without)."""
    h = net.x_embedder(x) + net.pos_embed
    with torch.no_grad():  # the tangent's residual stream in the primal's dtype (fp32 under autocast, as h is)
        dh = F.conv2d(dx.to(net.x_embedder.proj.weight.dtype), net.x_embedder.proj.weight,
                      stride=net.x_embedder.proj.stride).flatten(2).transpose(1, 2).to(h.dtype)
    for block in net.blocks:
        h, dh = _block_tangent(block, h, dh, c, dc)
    final = net.final_layer
    (shift, scale), (d_shift, d_scale) = _adaln_tangent(final.adaLN_modulation, c, dc, 2)
    m, dm = _modulated_norm(final.norm_final, h, dh, shift, scale, d_shift, d_scale)
    out = net.unpatchify(final.linear(m))
    with torch.no_grad():
        d_out = net.unpatchify(_linear_tangent(final.linear, dm))
    return out, d_out
