"""What the step benchmarks share: their arguments, a DiT with every block's tangent non-trivial, timing rows side by side,
and the plain diffusion training step they compare with."""
import argparse
import copy
import time

import torch

from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting
from speedpipe.models.dit import DiT_models
from speedpipe.training import train_step, update_ema


def step_arguments(doc: str) -> argparse.ArgumentParser:
    """The model, batch, precision and timing arguments of a step benchmark (CPU defaults: the demo's DiT-T/2, 4x8x8)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-T/2")
    ap.add_argument("--input-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=5, help="timed repeats per round")
    ap.add_argument("--rounds", type=int, default=3)
    return ap


def random_dit(args):
    """(device, the benchmark's DiT on it): seeded, TF32 on, every block's adaLN away from zero so that each block's
    tangent is computed in earnest."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    net = DiT_models[args.model](input_size=args.input_size).to(device)
    for block in net.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    return device, net


def _timed(fn, k, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(k):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_rows(rows: dict, steps: int, rounds: int, device) -> dict:
    """Seconds per call of each row: two warm-up calls each, then `rounds` rounds of `steps` calls, rows alternating so
    that drift in the machine's load hits every row alike."""
    for fn in rows.values():
        _timed(fn, 2, device)
    totals = dict.fromkeys(rows, 0.0)
    for _ in range(rounds):
        for label, fn in rows.items():
            totals[label] += _timed(fn, steps, device)
    return {label: seconds / (steps * rounds) for label, seconds in totals.items()}


def plain_train_step(model: str, input_size: int, n: int, precision: str, device):
    """A diffusion training step (forward, backward, AdamW, EMA) of a fresh DiT on random latents and labels."""
    diffusion = create_diffusion("")
    plain = DiT_models[model](input_size=input_size).to(device).train()
    ema = copy.deepcopy(plain).requires_grad_(False)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0, fused=(device.type == "cuda") or None)
    sampler, weights = build_sampler("uniform", diffusion), build_weighting("none", diffusion).to(device)
    params, ema_params = list(plain.parameters()), list(ema.parameters())
    latents = torch.randn(n, 4, input_size, input_size, device=device)
    y = torch.randint(0, 1000, (n,), device=device)

    def step():
        train_step(plain, diffusion, weights, opt, latents, y, sampler.sample(n).to(device), torch.randn_like(latents),
                   torch.zeros(n, dtype=torch.long, device=device), precision)
        update_ema(ema_params, params, 0.9999)
    return step


def device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
