"""sCD step cost relative to a plain training step, before and after the DiT's own tangent, unguided and guided.

    python benchmarks/scd_step.py                                                  # CPU: DiT-T/2, the demo's 4x8x8 latents, batch 64
    python benchmarks/scd_step.py --model DiT-XL/2 --input-size 32 --batch 32 --precision bf16   # GPU, ImageNet-256 per-GPU batch

Times, on random weights (throughput does not depend on them) and in one run, rounds alternating so that drift in
the machine's load hits every row alike: a plain diffusion training step (forward, backward, AdamW, EMA) of the same
network and batch; full sCD steps (teacher velocity, the student's graded pass and tangent, fp64 tangent and loss,
backward, Adam, EMA: speedpipe.consistency.methods.scd.SCDLoss) without guidance and with it (the teacher's batch
doubled), each two ways:
  before  a graded forward, then torch.func.jvp through the math attention kernel (TrigFlowStudent(own_tangent=False));
  after   the DiT's own tangent beside its graded forward, through the fused kernels (speedpipe.models.dit_tangent);
and the parts of a step alone: the teacher's forward, the graded forward+backward, torch.func.jvp, and the graded
forward with the tangent + backward.
"""
import copy

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from _steps import device_name, plain_train_step, random_dit, step_arguments, time_rows
from speedpipe.consistency.methods.scd import SCDLoss
from speedpipe.consistency.objectives import LogvarHead, graded_F, graded_F_and_tangent, sample_time, trigflow_point
from speedpipe.consistency.trigflow import TrigFlowStudent, TrigFlowTeacher
from speedpipe.diffusion import create_diffusion
from speedpipe.training import update_ema


def main():
    ap = step_arguments(__doc__)
    ap.add_argument("--cfg-scale", type=float, default=3.0, help="the guided rows' guidance (the demo's)")
    args = ap.parse_args()
    device, net = random_dit(args)
    n, shape = args.batch, (4, args.input_size, args.input_size)
    diffusion = create_diffusion("")
    teachers = {cfg: TrigFlowTeacher.over_latents(copy.deepcopy(net).eval().requires_grad_(False), diffusion.alphas_cumprod, 0.5, cfg)
                for cfg in (1.0, args.cfg_scale)}
    fused = device.type == "cuda"
    x0 = 0.5 * torch.randn(n, *shape, device=device)
    z = 0.5 * torch.randn(n, *shape, device=device)
    t = sample_time(n, 0.5, -0.8, 1.6, device=device)
    y = torch.randint(0, 1000, (n,), device=device)

    def scd_step(own_tangent, cfg):
        student = TrigFlowStudent(copy.deepcopy(net).eval(), 0.5, time_scale=1.0, own_tangent=own_tangent)
        head = LogvarHead().to(device)
        ema = copy.deepcopy(student.net).requires_grad_(False)
        opt = torch.optim.Adam([*student.net.parameters(), *head.parameters()], lr=1e-4, fused=fused or None)
        scd = SCDLoss(teachers[cfg], tangent_warmup=1, precision=args.precision)
        student_params, ema_params = list(student.net.parameters()), list(ema.parameters())

        def step():
            loss = scd(student, head, x0, z, t, y, step=1)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema_params, student_params, 0.9999)
        return step

    x_t, t64 = trigflow_point(x0, z, t)
    with torch.no_grad():
        dxt_dt = 0.5 * teachers[1.0](x_t.float() / 0.5, t64.float(), y).double()
    parts = {own: TrigFlowStudent(copy.deepcopy(net).eval(), 0.5, own_tangent=own) for own in (False, True)}

    def teacher_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            teachers[1.0](x_t.float() / 0.5, t64.float(), y)

    def graded_forward_backward():
        graded_F(parts[False], x_t, t64, y, args.precision).square().mean().backward()

    cos_sin = torch.cos(t64) * torch.sin(t64)
    primals = ((x_t / 0.5).float(), t64.float())
    tangents = ((cos_sin.view(-1, 1, 1, 1) * dxt_dt / 0.5).float(), cos_sin.float())

    def func_jvp():  # the tangent as "before" computes it, after its graded pass
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                             enabled=args.precision == "bf16"):
            jvp(lambda a, b: parts[False](a, b, y), primals, tangents)

    def graded_with_tangent_backward():
        F, _ = graded_F_and_tangent(parts[True], x_t, t64, y, dxt_dt, args.precision)
        F.square().mean().backward()

    plain_step = plain_train_step(args.model, args.input_size, n, args.precision, device)

    guided = f"guided (cfg {args.cfg_scale:g})"
    rows = {"plain train step": plain_step,
            "sCD step, unguided, before": scd_step(False, 1.0), "sCD step, unguided, after": scd_step(True, 1.0),
            f"sCD step, {guided}, before": scd_step(False, args.cfg_scale), f"sCD step, {guided}, after": scd_step(True, args.cfg_scale),
            "  teacher forward (unguided)": teacher_forward, "  graded forward+backward": graded_forward_backward,
            "  torch.func.jvp, math kernel (before)": func_jvp,
            "  graded forward+tangent+backward (after)": graded_with_tangent_backward}

    per_call = time_rows(rows, args.steps, args.rounds, device)
    k = args.steps * args.rounds
    print(f"device: {device_name(device)}; {args.model} on {shape} latents, batch {n}, {args.precision}; {k} timed repeats each")
    base = per_call["plain train step"]
    for label, per in per_call.items():
        print(f"  {label:44s} {1 / per:8.2f} /s  {1000 * per:9.1f} ms  {per / base:5.2f}x a plain train step")
    graded = per_call["  graded forward+backward"]
    print(f"  before: JVP / graded forward+backward: {per_call['  torch.func.jvp, math kernel (before)'] / graded:.2f}x")
    print(f"  after: the tangent's extra time / graded forward+backward: "
          f"{(per_call['  graded forward+tangent+backward (after)'] - graded) / graded:.2f}x")


if __name__ == "__main__":
    main()
