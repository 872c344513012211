"""Mutation check of the core maths: apply small mutations one at a time and report which the test suite misses.

    python tests/mutation_check.py                 # every mutation (about 20 minutes on 2 cores)
    python tests/mutation_check.py --only sCD       # the mutations whose name contains "sCD"

Each mutation edits one line of a copy of src/ (the checkout is never touched) and runs the tests that cover that
module, stopping at the first failure. A mutation that leaves them green "survives": either a test is missing or
the mutation does not change behaviour (an equivalent mutant); the README lists the survivors with the reason.
Not part of `make test` (it runs the suite dozens of times).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T = "tests/"
DIFFUSION_TESTS = [T + "test_diffusion.py", T + "test_timesteps.py"]
SCD_TESTS = [T + "test_consistency.py", T + "test_scd_exact.py"]
LOOP_TESTS = [T + "test_loop.py", T + "test_train.py", T + "test_consistency.py::test_distill_reduces_loss_and_resumes_bit_identical"]

# (name, file under src/speedpipe, exact text, replacement, tests that should catch it)
MUTATIONS = [
    ("DDIM: eta noise scale dropped", "diffusion/gaussian.py", "sigma = eta * torch.sqrt(", "sigma = 0 * eta * torch.sqrt(",
     DIFFUSION_TESTS),
    ("DDIM: sqrt(1 - abar_prev - sigma^2) without sigma", "diffusion/gaussian.py", "torch.sqrt(1 - a_bar_prev - sigma**2)",
     "torch.sqrt(1 - a_bar_prev)", DIFFUSION_TESTS),
    ("DDPM: no noise in ancestral steps", "diffusion/gaussian.py", "x = mean + torch.exp(0.5 * log_var) * z",
     "x = mean + 0 * z", DIFFUSION_TESTS),
    ("DDPM: std instead of variance", "diffusion/gaussian.py", "x = mean + torch.exp(0.5 * log_var) * z",
     "x = mean + torch.exp(log_var) * z", DIFFUSION_TESTS),
    ("learned range: interpolation reversed", "diffusion/gaussian.py", "log_variance = frac * max_log + (1 - frac) * min_log",
     "log_variance = frac * min_log + (1 - frac) * max_log", DIFFUSION_TESTS),
    ("posterior mean coef2 without sqrt(alpha)", "diffusion/gaussian.py",
     "self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)",
     "self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)", DIFFUSION_TESTS),
    ("hybrid loss: weight on the VLB too", "diffusion/gaussian.py", 'terms["loss"] = weight * mse + terms["vb"]',
     'terms["loss"] = weight * (mse + terms["vb"])', DIFFUSION_TESTS),
    ("hybrid loss: VLB sees the mean (no stop-gradient)", "diffusion/gaussian.py",
     "frozen_out = torch.cat([eps.detach(), model_output[:, C:]], dim=1).float()",
     "frozen_out = torch.cat([eps, model_output[:, C:]], dim=1).float()", DIFFUSION_TESTS),
    ("trailing respacing starts one step early", "diffusion/gaussian.py", "return {num_timesteps - 1 - round(i * num_timesteps / desired)",
     "return {num_timesteps - 2 - round(i * num_timesteps / desired)", DIFFUSION_TESTS),
    ("SpeeD: k applied above tau", "diffusion/timesteps.py", "np.where(np.arange(T) < tau, float(k), 1.0)",
     "np.where(np.arange(T) >= tau, float(k), 1.0)", DIFFUSION_TESTS),
    ("SpeeD: mirror m + t", "diffusion/timesteps.py", "return torch.where(t < m, m - t, t - m)",
     "return torch.where(t < m, m + t, t - m)", DIFFUSION_TESTS),
    ("SpeeD: meaningful steps off by one", "diffusion/timesteps.py", "return int(np.argmax(grad < threshold)) + 1",
     "return int(np.argmax(grad < threshold))", DIFFUSION_TESTS),
    ("SpeeD weights: lam and 1 - lam swapped", "diffusion/timesteps.py", "(1 - lam) + (2 * lam - 1) * g_hat",
     "lam + (1 - 2 * lam) * g_hat", DIFFUSION_TESTS),
    ("lognormal: sigma^2 for sigma", "diffusion/timesteps.py",
     "log_sigma = 0.5 * np.log((1.0 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod)",
     "log_sigma = np.log((1.0 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod)", DIFFUSION_TESTS),
    ("min-SNR: gamma / SNR", "diffusion/timesteps.py", "np.minimum(snr, gamma) / snr", "np.maximum(snr, gamma) / snr",
     DIFFUSION_TESTS),
    ("sCD: tangent sign flipped", "consistency/scd.py", "g = g / _bcast(g_norm + self.tangent_c, g)",
     "g = -g / _bcast(g_norm + self.tangent_c, g)", SCD_TESTS),
    ("sCD: no tangent normalisation", "consistency/scd.py", "g = g / _bcast(g_norm + self.tangent_c, g)",
     "g = g / (1 + self.tangent_c)", SCD_TESTS),
    ("sCD: warmup r ignored (always 1)", "consistency/scd.py", "return min(1.0, step / self.tangent_warmup)", "return 1.0",
     SCD_TESTS),
    ("sCD: JVP tangent in t without cos t sin t", "consistency/scd.py",
     "tangents = ((_bcast(cos_sin, x_t) * dxt_dt / sigma_d).float(), cos_sin.float())",
     "tangents = ((_bcast(cos_sin, x_t) * dxt_dt / sigma_d).float(), torch.ones_like(cos_sin).float())", SCD_TESTS),
    ("sCD: teacher velocity not times sigma_d", "consistency/scd.py",
     "dxt_dt = sigma_d * self.teacher(x_t.float() / sigma_d, t64.float(), y).double()",
     "dxt_dt = self.teacher(x_t.float() / sigma_d, t64.float(), y).double()", SCD_TESTS),
    ("sCD sampler: t_mid not used for re-noising", "consistency/scd.py",
     "x_mid = math.cos(self.mid_t) * x0 + math.sin(self.mid_t) * sigma_d * z2", "x_mid = x0 + sigma_d * z2", SCD_TESTS),
    ("TrigFlow: consistency sign", "consistency/trigflow.py",
     "return _bcast(torch.cos(t), x_t) * x_t - _bcast(torch.sin(t), x_t) * self.sigma_d * F",
     "return _bcast(torch.cos(t), x_t) * x_t + _bcast(torch.sin(t), x_t) * self.sigma_d * F", SCD_TESTS),
    ("TrigFlow teacher: x_n without 1/cos t", "consistency/trigflow.py",
     "x_n = _bcast(alpha_bar.sqrt() / (L * torch.cos(t)), x_t) * x_t", "x_n = _bcast(alpha_bar.sqrt() / L, x_t) * x_t", SCD_TESTS),
    ("TrigFlow teacher: index rounded", "consistency/trigflow.py", "return i.to(log_alpha_bar.dtype) + (lo - log_alpha_bar) / (lo - hi)",
     "return i.to(log_alpha_bar.dtype)", SCD_TESTS),
    ("student: time input ignores time_scale", "consistency/trigflow.py", "return self.time_scale * t", "return 0 * t", SCD_TESTS),
    ("train stage: always uniform timesteps", "stages/train.py",
     "sampler = build_sampler(cfg.diffusion.timestep_sampler.name, diffusion,",
     "sampler = build_sampler(\"uniform\", diffusion) or build_sampler(cfg.diffusion.timestep_sampler.name, diffusion,",
     [T + "test_train.py::test_training_uses_the_configured_timestep_sampler_and_weighting"]),
    ("train stage: loss weighting ignored", "stages/train.py",
     "mse_weight = build_weighting(cfg.diffusion.loss_weighting.name, diffusion,",
     "mse_weight = 0 * build_weighting(\"none\", diffusion) + 1 + 0 * build_weighting(cfg.diffusion.loss_weighting.name, diffusion,",
     [T + "test_train.py::test_training_uses_the_configured_timestep_sampler_and_weighting"]),
    ("loop: resume ignores the saved RNG", "loop.py", 'restore_rng(state["rng"], self.generators)', "pass", LOOP_TESTS),
    ("loop: resume restarts from step 0", "loop.py",
     'self.step, self.skipped = int(state["step"]), int(state.get("skipped", 0))', "self.step, self.skipped = 0, 0", LOOP_TESTS),
    ("loop: resume prefers the older file", "loop.py", 'if not ckpts or state["step"] >= ckpts[-1][0]:',
     'if not ckpts or state["step"] < ckpts[-1][0]:', LOOP_TESTS),
    ("loop: signal handled mid-step", "loop.py", "_ACTIVE._preempt = (original, sig, frame)", "original(sig, frame)", LOOP_TESTS),
    ("loop: no non-finite check before a resume save", "loop.py",
     'if self.nonfinite == "stop" and (step % c.log_every == 0 or at_ckpt or resume_due):',
     'if self.nonfinite == "stop" and (step % c.log_every == 0 or at_ckpt):', LOOP_TESTS),
    ("checkpoint: RNG state not restored for generators", "checkpoint.py", "g.set_state(state[name])", "pass", LOOP_TESTS),
    ("data order: resume restarts the epoch", "data/order.py", 'self.epoch, self.position = state["epoch"], state["position"]',
     'self.epoch, self.position = state["epoch"], 0', LOOP_TESTS),
]


def run_mutation(name, rel, old, new, tests, scratch: Path) -> tuple[bool, float, str]:
    target = scratch / "src" / "speedpipe" / rel
    original = target.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"mutation {name!r}: the text to mutate occurs {original.count(old)} times in {rel}")
    target.write_text(original.replace(old, new))
    try:
        env = {**os.environ, "PYTHONPATH": str(scratch / "src"), "OMP_NUM_THREADS": "2"}
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=scratch, env=env, capture_output=True, text=True)
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED") or line.startswith("ERROR")]
        return result.returncode != 0, time.time() - start, failed[0] if failed else ""
    finally:
        target.write_text(original)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only mutations whose name contains this text")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m[0]]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shutil.copytree(REPO / "src", scratch / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        shutil.copytree(REPO / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for entry in ("main.py", "configs"):
            (shutil.copytree if (REPO / entry).is_dir() else shutil.copy)(REPO / entry, scratch / entry)
        killed = 0
        for name, rel, old, new, tests in chosen:
            caught, seconds, by = run_mutation(name, rel, old, new, tests, scratch)
            killed += caught
            print(f"{'killed  ' if caught else 'SURVIVED'} {seconds:6.1f}s  {name:55s} {by[:90]}", flush=True)
    print(f"{killed} of {len(chosen)} mutations killed ({killed / len(chosen):.0%})")


if __name__ == "__main__":
    main()
