"""Sampling throughput: DDPM-250 of a DiT teacher versus its sCM student in 1 and 2 steps, side by side.

    python benchmarks/sampling.py --teacher results/demo/train/speed-s0/ckpt-0000800.pt \
                                  --student results/demo/distill/speed-s0/ckpt-0000400.pt
    python benchmarks/sampling.py --model DiT-XL/2 --cfg-scale 4 --precision bf16 --batch 125   # GPU, random weights

Times latent generation (the network evaluations), not decoding.
With --model instead of checkpoints it builds randomly initialised networks: throughput does not depend
on the weights. Every row is measured in the same run, so the ratios compare like with like.
"""
import argparse
import copy
import time

import torch
from omegaconf import OmegaConf

from speedpipe.checkpoint import load_checkpoint
from speedpipe.consistency.sampling import ConsistencySampler
from speedpipe.consistency.trigflow import TrigFlowStudent
from speedpipe.stages.sample import DiffusionSampler
from speedpipe.models.dit import build_model


def sampling_cfg(sampler, cfg_scale, precision):
    return OmegaConf.create({"sampler": sampler, "cfg_scale": cfg_scale, "dit_compat": False, "ddim_eta": 0.0,
                             "precision": precision, "use_ema": True, "scm_mid_t": 1.1})


def models(args, device):
    """(teacher DiT, its train config, student DiT, sigma_d, time_scale)."""
    if args.teacher:
        t_state = load_checkpoint(args.teacher)
        run_cfg = OmegaConf.create(t_state["config"])
        teacher = build_model(run_cfg)
        teacher.load_state_dict(t_state["ema"])
        student, sigma_d, time_scale = copy.deepcopy(teacher), 0.5, 1.0
        if args.student:
            s_state = load_checkpoint(args.student)
            student.load_state_dict(s_state["ema"])
            sigma_d, time_scale = s_state["config"]["distill"]["sigma_d"], s_state["config"]["distill"]["time_scale"]
        return teacher.to(device).eval(), run_cfg, student.to(device).eval(), sigma_d, time_scale
    run_cfg = OmegaConf.create({"model": {"name": args.model, "input_size": args.input_size, "in_channels": 4, "num_classes": 1000,
                                          "class_dropout_prob": 0.1, "fused_attn": True, "init_from": None},
                                "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}})
    teacher = build_model(run_cfg).to(device).eval()
    return teacher, run_cfg, copy.deepcopy(teacher), 0.5, 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="train checkpoint (EMA weights)")
    ap.add_argument("--student", help="distill checkpoint (EMA weights)")
    ap.add_argument("--model", default="DiT-T/2", help="with no checkpoints: a randomly initialised DiT of this size")
    ap.add_argument("--input-size", type=int, default=32, help="latent size of the random model (32 = 256px images)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--teacher-sampler", default="ddpm250")
    ap.add_argument("--scm-repeats", type=int, default=20, help="timed repeats of the fast samplers")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, run_cfg, student_net, sigma_d, time_scale = models(args, device)
    labels = torch.arange(args.batch, device=device) % teacher.num_classes
    ddpm = DiffusionSampler(teacher, run_cfg, sampling_cfg(args.teacher_sampler, args.cfg_scale, args.precision))
    student = TrigFlowStudent(student_net, sigma_d, time_scale)
    latent_shape = (run_cfg.model.in_channels, run_cfg.model.input_size, run_cfg.model.input_size)
    rows = [(args.teacher_sampler, ddpm, 1)] + [(f"scm{k}", ConsistencySampler(student, latent_shape, k), args.scm_repeats) for k in (1, 2)]

    def timed(sampler, repeats):
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            sampler(labels[:2], generator)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                sampler(labels, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {run_cfg.model.name} on {latent_shape} latents, batch {args.batch}, cfg {args.cfg_scale}, "
          f"{args.precision}; latent generation only (no decoding)")
    base = None
    for label, sampler, repeats in rows:
        seconds = timed(sampler, repeats)
        images_per_s = args.batch / seconds
        base = base or images_per_s
        print(f"  {label:8s} NFE {sampler.nfe:4d}  {images_per_s:10.1f} images/s  speed-up vs {args.teacher_sampler}: "
              f"{images_per_s / base:7.1f}x")


if __name__ == "__main__":
    main()
