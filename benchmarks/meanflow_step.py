"""MeanFlow and iMF's loss step costs against a plain training step, beside sCD and sCT, in one run.

    python benchmarks/meanflow_step.py                                             # CPU: DiT-T/2, the demo's 4x8x8 latents, batch 64
    python benchmarks/meanflow_step.py --model DiT-XL/2 --input-size 32 --batch 32 --precision bf16   # GPU, ImageNet-256 per-GPU batch

Random weights (throughput does not depend on them), rows alternating (benchmarks/_steps.py). Every consistency step
is the whole step: objective (speedpipe.consistency), backward, Adam, EMA. MeanFlow's derivative along (v, 0, 1) goes
through the DiT's own tangent (MeanFlowStudent.with_tangent) or, in the reference row, torch.func.jvp through the math
attention kernel; guided MeanFlow adds the two no-gradient passes of its training-time guidance (ω = 1, κ = 0.5).
"""
import copy

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from _steps import device_name, plain_train_step, random_dit, step_arguments, time_rows
from speedpipe.consistency.meanflow import MeanFlowObjective, MeanFlowStudent, MeanFlowTimes, TrainingGuidance
from speedpipe.consistency.methods.scd import SCDLoss
from speedpipe.consistency.methods.sct import SCTLoss
from speedpipe.consistency.objectives import LogvarHead, sample_time
from speedpipe.consistency.trigflow import TrigFlowStudent, TrigFlowTeacher
from speedpipe.diffusion import create_diffusion
from speedpipe.training import update_ema


class JVPMeanFlowStudent(MeanFlowStudent):
    """The same student with its derivative from torch.func.jvp (math attention kernel) after a graded pass."""

    def with_tangent(self, z, r, t, dz, dr, dt, y):
        u = self(z, r, t, y)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, du = jvp(lambda a, b, c: self(a, b, c, y), (z, r, t), (dz, dr, dt))
        return u, du


def main():
    ap = step_arguments(__doc__)
    args = ap.parse_args()
    device, net = random_dit(args)
    n, shape = args.batch, (4, args.input_size, args.input_size)
    teacher = TrigFlowTeacher.over_latents(copy.deepcopy(net).eval().requires_grad_(False), create_diffusion("").alphas_cumprod, 0.5)
    x0, z = 0.5 * torch.randn(n, *shape, device=device), 0.5 * torch.randn(n, *shape, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    trigflow_t = sample_time(n, 0.5, -0.8, 1.6, device=device)
    meanflow_times = MeanFlowTimes(-0.4, 1.0, 0.25).sample(n).to(device)

    def step_of(objective, make_student, times):
        student = make_student(TrigFlowStudent(copy.deepcopy(net).eval(), 0.5, time_scale=1.0))
        head = LogvarHead().to(device)
        ema = copy.deepcopy(student.net).requires_grad_(False)
        trained = [p for p in (*student.net.parameters(), *head.parameters()) if p.requires_grad]
        opt = torch.optim.Adam(trained, lr=1e-4, fused=(device.type == "cuda") or None)
        params, ema_params = list(student.net.parameters()), list(ema.parameters())

        def step():
            loss = objective(student, head, x0, z, times, y, 1)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema_params, params, 0.9999)
        return step

    plain_guidance, guided = TrainingGuidance(1.0, 0.0, 0.0, 1.0), TrainingGuidance(1.0, 0.5, 0.0, 1.0)
    meanflow = lambda guidance, imf=False: MeanFlowObjective(guidance, 1.0, 1e-3, args.precision, imf=imf)  # noqa: E731
    same = lambda student: student  # noqa: E731
    rows = {
        "plain train step": plain_train_step(args.model, args.input_size, n, args.precision, device),
        "sCD step": step_of(SCDLoss(teacher, 1, precision=args.precision), same, trigflow_t),
        "sCT step": step_of(SCTLoss(1, precision=args.precision), same, trigflow_t),
        "MeanFlow step (own tangent)": step_of(meanflow(plain_guidance), MeanFlowStudent, meanflow_times),
        "MeanFlow step (torch.func.jvp)": step_of(meanflow(plain_guidance), JVPMeanFlowStudent, meanflow_times),
        "MeanFlow step, guided (own tangent)": step_of(meanflow(guided), MeanFlowStudent, meanflow_times),
        "iMF's loss step (own tangent)": step_of(meanflow(plain_guidance, imf=True), MeanFlowStudent, meanflow_times),
    }
    per_call = time_rows(rows, args.steps, args.rounds, device)
    print(f"device: {device_name(device)}; {args.model} on {shape} latents, batch {n}, {args.precision}; "
          f"{args.steps * args.rounds} timed repeats each")
    base = per_call["plain train step"]
    for label, per in per_call.items():
        print(f"  {label:40s} {1 / per:8.2f} /s  {1000 * per:9.1f} ms  {per / base:5.2f}x a plain train step")
    print(f"  MeanFlow's own tangent / torch.func.jvp: "
          f"{per_call['MeanFlow step (own tangent)'] / per_call['MeanFlow step (torch.func.jvp)']:.2f}x the step")


if __name__ == "__main__":
    main()
