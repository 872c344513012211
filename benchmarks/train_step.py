"""Training-step throughput: speedpipe's step (eager and compiled) versus a plain DiT train.py-style step.

    python benchmarks/train_step.py --model DiT-S/2 --batch 32                                 # CPU
    python benchmarks/train_step.py --model DiT-XL/2 --batch 256 --precision bf16 --compile   # GPU

speedpipe's step: F.scaled_dot_product_attention, foreach (CPU) / fused (CUDA) AdamW, foreach EMA update,
optional bf16 autocast and torch.compile. The plain step is what the original DiT train.py does: eager,
explicit softmax attention, per-tensor AdamW, a per-parameter EMA loop, fp32 (TF32 matmuls on CUDA). All
rows train the same model size on the same data; rounds alternate so drift in machine load hits every row
alike. On CUDA the MFU is given against the dense bf16 matmul rate measured in the same run (an 8192³
product) and against the datasheet peak; model FLOPs = 3 × 2 × forward MACs per image (DiT paper count).
"""
import argparse
import copy
import time

import torch

from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting
from speedpipe.models.dit import DiT_models, forward_macs
from speedpipe.training import train_step, update_ema

# Dense bf16 tensor-core datasheet peaks (TFLOP/s).
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n, device):
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def measured_matmul_tflops(device, n=8192, repeats=20) -> float:
    """Dense bf16 matmul rate of this device (TFLOP/s): the ceiling a training step's MFU is read against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    timed(lambda: a @ b, 3, device)
    return 2 * n**3 * repeats / timed(lambda: a @ b, repeats, device) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="also time speedpipe's step under torch.compile")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain DiT step (e.g. when it does not fit in memory)")
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
    sampler = build_sampler("speed", diffusion, k=5, tau=700)
    weights = build_weighting("speed", diffusion, lam=0.6, tau=700).to(device)

    def speedpipe_step_fn(compiled: bool):
        model = DiT_models[args.model](input_size=args.input_size).to(device).train()
        ema = copy.deepcopy(model).requires_grad_(False)
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=fused or None, foreach=None if fused else True)
        net = torch.compile(model) if compiled else model
        params, ema_params = list(model.parameters()), list(ema.parameters())

        def step():
            t = sampler.sample(args.batch).to(device)
            drop = (torch.rand(args.batch) < 0.1).long().to(device)
            train_step(net, diffusion, weights, opt, x, y, t, torch.randn_like(x), drop, args.precision)
            update_ema(ema_params, params, 0.9999)

        return step, model

    rows = {}
    rows["speedpipe"], model = speedpipe_step_fn(False)
    if args.compile:
        rows["speedpipe+compile"], _ = speedpipe_step_fn(True)
    if not args.no_plain:
        plain = DiT_models[args.model](input_size=args.input_size, fused_attn=False).to(device).train()
        plain_ema = copy.deepcopy(plain).requires_grad_(False)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0, foreach=False)
        rows["plain"] = lambda: plain_step(plain, plain_ema, diffusion, plain_opt, x, y)

    for fn in rows.values():
        timed(fn, args.warmup, device)  # includes torch.compile's compilation
    totals = dict.fromkeys(rows, 0.0)
    for _ in range(args.rounds):
        for label, fn in rows.items():
            totals[label] += timed(fn, args.steps, device)

    n = args.steps * args.rounds
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model {args.model} @ {args.input_size}x{args.input_size} latents, batch {args.batch}, "
          f"precision {args.precision} (plain: fp32/TF32), {n} timed steps each")
    flops_per_image = 3 * 2 * forward_macs(model)  # forward + backward ≈ 3 forward passes; FLOPs = 2 MACs
    peaks = {}
    if device.type == "cuda":
        peaks["measured bf16 matmul"] = measured_matmul_tflops(device)
        datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
        if datasheet:
            peaks["datasheet bf16 dense"] = datasheet
        print("  peaks: " + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items()))
    for label, seconds in totals.items():
        steps_s = n / seconds
        achieved = steps_s * args.batch * flops_per_image / 1e12
        line = f"  {label:18s} {steps_s:8.3f} steps/s  {steps_s * args.batch:9.1f} images/s  {achieved:7.1f} TFLOP/s"
        line += "".join(f"  MFU {achieved / v:.1%} of {k}" for k, v in peaks.items())
        print(line)
    for label in totals:
        if label != "speedpipe":
            print(f"  {label} runs at {totals['speedpipe'] / totals[label]:.2f}x the speed of speedpipe's eager step")


if __name__ == "__main__":
    main()
