"""sCD step throughput of a DiT student, and what its parts cost relative to a plain training step.

    python benchmarks/scd_step.py --model DiT-T/2 --input-size 8 --batch 64                 # CPU, the demo's size
    python benchmarks/scd_step.py --model DiT-XL/2 --batch 32 --precision bf16              # GPU, ImageNet per-GPU batch

Times, on random weights (throughput does not depend on them) and in one run: a plain diffusion training step
(forward, backward, AdamW, EMA) of the same network and batch; a full sCD step (teacher velocity, JVP, graded
pass, fp64 tangent and loss, backward, Adam, EMA: speedpipe.consistency.scd.SCDLoss); and the sCD step's parts
alone: the teacher's forward, the JVP (forward-mode, math attention kernel) and the graded forward+backward.
"""
import argparse
import copy
import time

import torch

from speedpipe.consistency.scd import LogvarHead, SCDLoss, graded_F, jvp_dF_dt, sample_time, trigflow_point
from speedpipe.consistency.trigflow import TrigFlowStudent, TrigFlowTeacher
from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting
from speedpipe.models.dit import DiT_models
from speedpipe.training import train_step, update_ema


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-T/2")
    ap.add_argument("--input-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=5, help="timed repeats per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    n, shape = args.batch, (4, args.input_size, args.input_size)
    diffusion = create_diffusion("")
    net = DiT_models[args.model](input_size=args.input_size).to(device)
    teacher = TrigFlowTeacher.over_latents(copy.deepcopy(net).eval().requires_grad_(False), diffusion.alphas_cumprod, 0.5)
    student = TrigFlowStudent(copy.deepcopy(net).eval(), 0.5, time_scale=1.0)
    head = LogvarHead().to(device)
    ema = copy.deepcopy(student.net).requires_grad_(False)
    fused = device.type == "cuda"
    opt = torch.optim.Adam([*student.net.parameters(), *head.parameters()], lr=1e-4, fused=fused or None)
    scd = SCDLoss(teacher, tangent_warmup=1, precision=args.precision)
    x0 = 0.5 * torch.randn(n, *shape, device=device)
    z = 0.5 * torch.randn(n, *shape, device=device)
    t = sample_time(n, 0.5, -0.8, 1.6, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    student_params, ema_params = list(student.net.parameters()), list(ema.parameters())

    def scd_step():
        loss = scd(student, head, x0, z, t, y, step=1)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema_params, student_params, 0.9999)

    x_t, t64 = trigflow_point(x0, z, t)
    with torch.no_grad():
        dxt_dt = 0.5 * teacher(x_t.float() / 0.5, t64.float(), y).double()

    def teacher_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            teacher(x_t.float() / 0.5, t64.float(), y)

    def jvp_only():
        jvp_dF_dt(student, x_t, t64, y, dxt_dt, args.precision)

    def graded_forward_backward():
        graded_F(student, x_t, t64, y, args.precision).square().mean().backward()

    plain = DiT_models[args.model](input_size=args.input_size).to(device).train()
    plain_ema = copy.deepcopy(plain).requires_grad_(False)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0, fused=fused or None)
    sampler, weights = build_sampler("uniform", diffusion), build_weighting("none", diffusion).to(device)
    plain_params, plain_ema_params = list(plain.parameters()), list(plain_ema.parameters())
    latents = torch.randn(n, *shape, device=device)

    def plain_step():
        train_step(plain, diffusion, weights, plain_opt, latents, y, sampler.sample(n).to(device), torch.randn_like(latents),
                   torch.zeros(n, dtype=torch.long, device=device), args.precision)
        update_ema(plain_ema_params, plain_params, 0.9999)

    rows = {"plain train step": plain_step, "sCD step": scd_step, "  teacher forward": teacher_forward,
            "  JVP (forward mode)": jvp_only, "  graded forward+backward": graded_forward_backward}

    def timed(fn, k):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(k):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in rows.values():
        timed(fn, 2)
    totals = dict.fromkeys(rows, 0.0)
    for _ in range(args.rounds):
        for label, fn in rows.items():
            totals[label] += timed(fn, args.steps)
    k = args.steps * args.rounds
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.model} on {shape} latents, batch {n}, {args.precision}; {k} timed repeats each")
    base = totals["plain train step"] / k
    for label, seconds in totals.items():
        per = seconds / k
        print(f"  {label:28s} {1 / per:8.2f} /s  {1000 * per:9.1f} ms  {per / base:5.2f}x a plain train step")
    print(f"  JVP / graded forward+backward: {totals['  JVP (forward mode)'] / totals['  graded forward+backward']:.2f}x")


if __name__ == "__main__":
    main()
