"""Training-step throughput: speedpipe's step versus a plain DiT train.py-style step, measured side by side.

    python benchmarks/train_step.py --model DiT-S/2 --batch 32            # CPU
    python benchmarks/train_step.py --model DiT-XL/2 --batch 256 --precision bf16 --compile   # GPU

speedpipe's step: F.scaled_dot_product_attention, foreach (CPU) / fused (CUDA) AdamW, foreach EMA update,
optional bf16 autocast and torch.compile. The plain step is what the original DiT train.py does: eager,
explicit softmax attention, per-tensor AdamW, a per-parameter EMA loop. Both train the same model on the
same data; rounds alternate so drift in machine load hits both alike. On CUDA it also prints MFU.
"""
import argparse
import copy
import time

import torch

from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting
from speedpipe.models.dit import DiT_models, forward_macs
from speedpipe.stages.train import train_step, update_ema

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def plain_step(model, ema, diffusion, opt, x, y):
    """DiT train.py: uniform t, model-internal label dropout, loss, backward, step, per-parameter EMA."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    noise = torch.randn_like(x)
    x_t = diffusion.q_sample(x, t, noise)
    loss = diffusion.training_losses(model(x_t, t, y), x, x_t, t, noise)["loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        ema_params = dict(ema.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    diffusion = create_diffusion("")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    fast = DiT_models[args.model](input_size=args.input_size).to(device).train()
    fast_ema = copy.deepcopy(fast).requires_grad_(False)
    fused = device.type == "cuda"
    fast_opt = torch.optim.AdamW(fast.parameters(), lr=1e-4, weight_decay=0, fused=fused or None, foreach=None if fused else True)
    fast_net = torch.compile(fast) if args.compile else fast
    sampler = build_sampler("speed", diffusion, k=5, tau=700)
    weights = build_weighting("speed", diffusion, lam=0.6, tau=700).to(device)
    fast_params, ema_params = list(fast.parameters()), list(fast_ema.parameters())

    def speedpipe_step():
        t = sampler.sample(args.batch).to(device)
        drop = (torch.rand(args.batch) < 0.1).long().to(device)
        train_step(fast_net, diffusion, weights, fast_opt, x, y, t, torch.randn_like(x), drop, args.precision)
        update_ema(ema_params, fast_params, 0.9999)

    plain = DiT_models[args.model](input_size=args.input_size, fused_attn=False).to(device).train()
    plain_ema = copy.deepcopy(plain).requires_grad_(False)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0, foreach=False)

    def baseline_step():
        plain_step(plain, plain_ema, diffusion, plain_opt, x, y)

    def timed(fn, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in (speedpipe_step, baseline_step):
        timed(fn, args.warmup)
    totals = {"speedpipe": 0.0, "plain": 0.0}
    for _ in range(args.rounds):
        totals["speedpipe"] += timed(speedpipe_step, args.steps)
        totals["plain"] += timed(baseline_step, args.steps)

    n = args.steps * args.rounds
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model {args.model} @ {args.input_size}x{args.input_size} latents, batch {args.batch}, "
          f"precision {args.precision}, compile {args.compile}, {n} timed steps each")
    flops_per_image = 3 * 2 * forward_macs(fast)  # forward + backward ≈ 3 forward passes; FLOPs = 2 MACs
    for label, seconds in totals.items():
        steps_s = n / seconds
        line = f"  {label:10s} {steps_s:8.3f} steps/s  {steps_s * args.batch:9.1f} images/s"
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if device.type == "cuda" and peak:
            line += f"  MFU {steps_s * args.batch * flops_per_image / (peak * 1e12):.1%} (of {peak:.0f} TFLOP/s bf16 dense)"
        print(line)
    print(f"  speed-up (speedpipe / plain): {totals['plain'] / totals['speedpipe']:.2f}x")


if __name__ == "__main__":
    main()
