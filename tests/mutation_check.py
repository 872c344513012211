"""Mutation check: apply small defects one at a time and report which the test suite misses.

    python tests/mutation_check.py                 # every mutation: the formulas', then one per setting
    python tests/mutation_check.py --only sCD       # the mutations whose name contains "sCD"
    python tests/mutation_check.py --keys           # the setting mutations only
    python tests/mutation_check.py --mechanical     # every numeric literal and binary operator of the formula modules
    python tests/mutation_check.py --mechanical --only uncertainty.py   # ... of one module

Formula mutations edit one line of a copy of src/ (the checkout is never touched) and run the tests that cover that
module, stopping at the first failure. The mechanical family (--mechanical) is generated from the formula modules'
syntax: each numeric literal scaled (an integer + 1, a float x 2, 0.0 -> 1.0) and each binary operator swapped (+ -, * /,
** -> *, // -> *, % -> //), one at a time, against the module's covering tests (FORMULA_MODULES); literals in
error messages, default arguments, indices and assertions are left alone (they are not formulas). A survivor is
killed by a new test or listed in EQUIVALENT with the reason. Setting mutations are generated from the stage registry (speedpipe.stages): for
every key a stage reads, the stage sees that key at its default -- injected where the stage reads its config
(`Stage.view`, patched by a sitecustomize module on the PYTHONPATH of every process of the run, Snakemake's jobs
included), so the saved provenance config still shows the value asked for -- and the key's test in
tests/test_settings.py runs (the covering test of a key is that one test: a few seconds, where the whole suite would
take 20 minutes a key). A key added to a stage's reads is covered by construction (its test then exists, or
test_every_read_key_has_a_case fails). The directional keys of tests/test_contracts.py are mutated a second way, read
the wrong way round, and their plumbing test runs. A mutation that leaves its tests green
"survives": either a test is missing or the mutation does not change behaviour (an equivalent mutant); the script
prints the keys no test pins, tests/README.md lists the survivors with the reason. Not part of `make test`.
"""
import argparse
import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T = "tests/"
DIFFUSION_TESTS = [T + "test_diffusion.py", T + "test_timesteps.py"]
SCD_TESTS = [T + "test_consistency.py", T + "test_consistency_exact.py"]
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
    ("sCD: tangent sign flipped", "consistency/objectives.py", "g = g / _bcast(g_norm + self.tangent_c, g)",
     "g = -g / _bcast(g_norm + self.tangent_c, g)", SCD_TESTS),
    ("sCD: no tangent normalisation", "consistency/objectives.py", "g = g / _bcast(g_norm + self.tangent_c, g)",
     "g = g / (1 + self.tangent_c)", SCD_TESTS),
    ("sCD: warmup r ignored (always 1)", "consistency/objectives.py", "return min(1.0, step / self.tangent_warmup)", "return 1.0",
     SCD_TESTS),
    ("sCD: JVP tangent in t without cos t sin t", "consistency/objectives.py",
     "(_bcast(cos_sin, x_t) * dxt_dt / student.sigma_d).float(), cos_sin.float(), y)",
     "(_bcast(cos_sin, x_t) * dxt_dt / student.sigma_d).float(), torch.ones_like(cos_sin).float(), y)", SCD_TESTS),
    ("sCD: teacher velocity not times sigma_d", "consistency/methods/scd.py",
     "return sigma_d * self.teacher(x_t.float() / sigma_d, t.float(), y).double()",
     "return self.teacher(x_t.float() / sigma_d, t.float(), y).double()", SCD_TESTS),
    ("sCT: the pair's velocity with z and x0 swapped", "consistency/methods/sct.py", "return data_velocity(x0, z, t)",
     "return data_velocity(z, x0, t)", SCD_TESTS),
    ("DiT tangent: modulate without the scale's derivative", "models/dit_tangent.py",
     "dm = dn * (1 + scale.unsqueeze(1)) + n * d_scale.unsqueeze(1) + d_shift.unsqueeze(1)",
     "dm = dn * (1 + scale.unsqueeze(1)) + d_shift.unsqueeze(1)", SCD_TESTS),
    ("DiT tangent: attention without the softmax's derivative", "models/dit_tangent.py",
     "return torch.ops.aten._softmax_backward_data(ds.to(p.dtype), p, -1, p.dtype) @ v + p @ dv", "return p @ dv", SCD_TESTS),
    ("DiT tangent: gate's derivative dropped", "models/dit_tangent.py",
     "dx = dx + d_gate_mlp.unsqueeze(1) * h + gate_mlp.unsqueeze(1) * dh", "dx = dx + gate_mlp.unsqueeze(1) * dh", SCD_TESTS),
    ("DiT tangent: time_scale missing from the time input's tangent", "consistency/trigflow.py",
     "(self.time_scale * dt).to(dtype), y)  # c_noise is linear in t", "dt.to(dtype), y)  # c_noise is linear in t", SCD_TESTS),
    ("sCD sampler: t_mid not used for re-noising", "consistency/sampling.py",
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
    ("loop: resume prefers the older file", "loop.py", "_, _, path, state = max(loaded, key=lambda f: (f[0], f[1]))",
     "_, _, path, state = min(loaded, key=lambda f: (f[0], f[1]))", LOOP_TESTS),
    ("loop: signal handled mid-step", "loop.py", "_ACTIVE._preempt = (original, sig, frame)", "original(sig, frame)", LOOP_TESTS),
    ("loop: no non-finite check before a resume save", "loop.py",
     'if self.nonfinite == "stop" and (step % c.log_every == 0 or at_ckpt or resume_due):',
     'if self.nonfinite == "stop" and (step % c.log_every == 0 or at_ckpt):', LOOP_TESTS),
    ("checkpoint: RNG state not restored for generators", "checkpoint.py", "g.set_state(state[name])", "pass", LOOP_TESTS),
    ("data order: resume restarts the epoch", "data/order.py", 'self.epoch, self.position = state["epoch"], state["position"]',
     'self.epoch, self.position = state["epoch"], 0', LOOP_TESTS),
    # no lost work (docs/faults.md)
    ("run store: checkpoints kept only in the declared folder", "loop.py", "self.state_dir = self.folder.state_dir",
     "self.state_dir = self.run_dir", LOOP_TESTS),
    ("run store: declared checkpoints not re-made on a re-run", "runstore.py", "        for name in sorted(current):\n            self.publish_file(name)",
     "        pass", LOOP_TESTS),
    ("run store: a corrupt latest.pt stops the resume", "loop.py", 'self._event("unreadable", path.name)\n                continue',
     'self._event("unreadable", path.name)\n                raise', LOOP_TESTS),
    ("run store: a second writer does not wait", "runstore.py", "            fcntl.flock(f, fcntl.LOCK_EX)\n",
     "            pass\n", [T + "test_run_folders.py"]),
    ("run store: a failed sampling job's finished files sampled again", "stages/sample.py", "if kept.complete():",
     "if False:", [T + "test_run_folders.py"]),
    ("run store: prune without --yes removes", "runstore.py", "if args.yes:\n                shutil.rmtree(state)",
     "if True:\n                shutil.rmtree(state)", [T + "test_run_folders.py"]),
    ("run store: a declared checkpoint below the newest state never made", "loop.py", "            if missing:\n",
     "            if False:\n", LOOP_TESTS),
    ("run store: a failed resume keeps the lock", "loop.py", "        except BaseException:\n            self.folder.unlock()\n",
     "        except BaseException:\n", LOOP_TESTS),
    ("run store: a killed write's partial file left in the store", "runstore.py", "            partial.unlink()", "            pass",
     LOOP_TESTS),
    ("run store: an adopted run loses its log", "runstore.py", 'for name in (path.name, *(("log.csv", "events.csv") if same else ())):',
     "for name in (path.name,):", LOOP_TESTS),
    ("standalone: a data stage replaces the pipeline's data of other settings", "cli.py",
     "    if stage in DATA_STAGES:\n        _refuse_to_replace(stage, config)\n", "", [T + "test_run_folders.py"]),
    ("data identity: photos by size and time, not content", "data/images.py", 'h.update(f"{r}|{label}|{contents[r]}\\n".encode())',
     'h.update(f"{r}|{label}|{f.stat().st_size}\\n".encode())',
     [T + "test_content_cache.py::test_snakemake_replans_edited_photos_and_not_moved_ones"]),
    ("run identity: init_from by path, not content", "stages/__init__.py",
     'reads = with_contents(params["reads"], _plain(config), lambda path: content_fingerprint(',
     'reads = (lambda r, c, f: r)(params["reads"], _plain(config), lambda path: content_fingerprint(',
     [T + "test_content_cache.py"]),
    ("standalone: a train command writes into the pipeline's run", "layout.py",
     "Layout.standalone(cfg).train_dir(cfg.method, cfg.seed)", "Layout.of(cfg).train_dir(cfg.method, cfg.seed)",
     [T + "test_run_folders.py"]),
    ("slurm: job names shared between checkouts", "launch.py", "json.dumps([stage, config, str(Path.cwd().resolve())]",
     "json.dumps([stage, config, \"\"]", [T + "test_run_folders.py"]),
    ("slurm: squeue sees every user's jobs", "launch.py", '["squeue", "--me", "-h", "-n", name,', '["squeue", "-h", "-n", name,',
     [T + "test_run_folders.py"]),
    ("atomic write: the folder not synced", "io.py", "        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)\n", "",
     [T + "test_run_folders.py"]),
    ("write error: the path left out", "io.py", 'raise WriteError(f"cannot write {path}: {err}', 'raise WriteError(f"cannot write: {err}',
     [T + "test_faults.py::test_a_full_disk_keeps_the_previous_state_and_the_same_command_finishes_once_space_is_freed"]),
    ("teacher identity: the checkpoint file's bytes", "stages/distill.py",
     '"teacher": teacher_state and state_fingerprint({k: teacher_state.get(k) for k in ("ema", "config", "latent_norm")})',
     '"teacher": teacher_state and __import__("speedpipe.io").io.sha256_file(d.teacher)',
     [T + "test_faults.py::test_a_failed_train_job_and_a_failed_distill_job_are_finished_by_the_same_command[SIGKILL]"]),
]


FORMULAS = T + "test_formulas.py"  # the hand computations: first, so that most mutants fail within seconds
# module under src/speedpipe -> the tests that cover its formulas (the mixture tests of test_consistency_exact judge
# outcomes and take a minute: left out, so that a survivor here is a formula no test pins)
FORMULA_MODULES = {
    "diffusion/gaussian.py": [FORMULAS, T + "test_diffusion.py",
                              T + "test_choices.py::test_linear_schedule_is_evenly_spaced_betas_from_1e4_to_002_times_1000_over_T",
                              T + "test_choices.py::test_cosine_schedule_by_hand_on_three_steps"],
    "diffusion/timesteps.py": [FORMULAS, T + "test_timesteps.py"],
    "consistency/objectives.py": [FORMULAS, T + "test_consistency.py"],
    "consistency/trigflow.py": [FORMULAS, T + "test_consistency.py"],
    "consistency/sampling.py": [FORMULAS, T + "test_consistency.py"],
    "consistency/methods/scd.py": [FORMULAS, T + "test_consistency.py"],
    "consistency/meanflow.py": [T + "test_meanflow.py"],
    "models/dit_tangent.py": [T + "test_consistency.py"],
    "training.py": [FORMULAS, T + "test_contracts.py::test_the_ema_moves_towards_the_weights_by_one_minus_its_decay"],
    "uncertainty.py": [FORMULAS, T + "test_report.py"],
    "check.py": [FORMULAS, T + "test_check.py"],
}
SWAPPED = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"), ast.Pow: ("**", "*"),
           ast.FloorDiv: ("//", "*"), ast.Mod: ("%", "//")}
# "module: the line | old -> new #k" (the k-th such edit of that line's text in the module) -> why no test can kill it
EQUIVALENT = {
    'check.py: atomic_write_text(expected, json.dumps({**kept, "reference": json.loads(summary.read_text())}, indent=2)) | 2 -> 3 #1':
        "the indentation of the recorded expected.json: its layout, not its content",
    "diffusion/timesteps.py: cdf = np.array([0.5 * (1 + math.erf((e - mean) / (std * math.sqrt(2)))) if np.isfinite(e) "
    "else float(e > 0) for e in edges]) | 0 -> 1 #1":
        "the branch sees only the outer edges, -inf and +inf: e > 1 is e > 0 there",
    "diffusion/timesteps.py: grad = np.gradient(1.0 - diffusion.alphas_cumprod) | 1.0 -> 2.0 #1":
        "the gradient of 1 - alpha_bar and of 2 - alpha_bar are the same (a constant has none)",
    "diffusion/timesteps.py: w = 1.0 / (1.0 + np.exp(-(b - lam))) * -np.gradient(lam) | 1.0 -> 2.0 #1":
        "a constant factor of the sigmoid weights, which are normalised to mean 1 after",
    "diffusion/gaussian.py: frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1) | 1 -> 2 #1":
        "the stride of a section of one step: its one step is taken at the section's start, whatever the stride",
}


def _not_formulas(tree) -> set[int]:
    """ids of the nodes that are no formula: error messages, default arguments, assertions, prints and indices."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.arguments, ast.Assert)) or (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"):
            skipped.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Subscript):
            skipped.update(id(n) for n in ast.walk(node.slice))
    return skipped


def mechanical_mutations(rel: str, source: str) -> list[tuple[str, int, int, str]]:
    """(name, start, end, replacement) of each literal and operator mutant of a module's source, in source order."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    starts = [sum(len(line) for line in lines[:i]) for i in range(len(lines) + 1)]
    offset = lambda lineno, col: starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())  # noqa: E731
    skipped, edits = _not_formulas(tree), []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
            value = node.value
            edits.append((start, end, repr(value + 1) if isinstance(value, int) else repr(value * 2) if value else "1.0"))
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAPPED:
            symbol, swapped = SWAPPED[type(node.op)]
            gap_start = offset(node.left.end_lineno, node.left.end_col_offset)
            gap = source[gap_start:offset(node.right.lineno, node.right.col_offset)]
            i = gap.find(symbol)
            while len(symbol) == 1 and gap[i:i + 2] in ("**", "//"):  # * of **, / of //
                i = gap.find(symbol, i + 2)
            edits.append((gap_start + i, gap_start + i + len(symbol), swapped))
    named, seen = [], {}
    for start, end, new in sorted(edits):
        lineno = next(i for i in range(len(lines)) if starts[i + 1] > start)
        old = source[start:end]
        key = (lines[lineno].strip(), old, new)  # #k counts the same edit of the same text, wherever it stands
        seen[key] = seen.get(key, 0) + 1
        named.append((f"{rel}: {lines[lineno].strip()} | {old} -> {new} #{seen[key]}", start, end, new))
    return named


# Injected into every Python process of a setting mutation (SPEEDPIPE_KEY_MUTATION="stage:key" or "stage:key:wrong"):
# the stage's view of its config holds the key's default instead of its value, or the value applied the wrong way
# round (a rate's complement, a flipped sign, a reciprocal, another of its choices, a pair swapped, a doubled count).
SITECUSTOMIZE = """
import os
_spec = os.environ.get("SPEEDPIPE_KEY_MUTATION")
if _spec:
    from omegaconf import OmegaConf
    from speedpipe import stages
    from speedpipe.config_schema import CHOICES
    from speedpipe.stages import _defaults, _get, _put
    _stage, _key, *_how = _spec.split(":")

    def _wrong(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, str):
            choices = CHOICES[_key]
            return choices[(choices.index(value) + 1) % len(choices)]
        if isinstance(value, list):
            return value[::-1]
        if isinstance(value, int):
            return 2 * value
        if 0 < value < 1:
            return 1 - value
        return -value if value < 0 else 1 / value

    _view = stages.Stage.view
    def view(self, config):
        v = _view(self, config)
        if self.name != _stage:
            return v
        plain = OmegaConf.to_container(v)
        _put(plain, _key, _wrong(_get(plain, _key, _stage)) if _how else _defaults("stage")[_key])
        mutated = OmegaConf.create(plain)
        OmegaConf.set_struct(mutated, True)
        OmegaConf.set_readonly(mutated, True)
        return mutated
    stages.Stage.view = view
"""


KEY_TIMEOUT = 120  # seconds; a setting's test takes a few unmutated
KEY_DISK = 2 << 30  # bytes; a setting's test writes a few MB unmutated (distill.steps read as its default: 20,000 steps
# with a checkpoint every 2 fills a disk in under a minute)


def _size(*folders: Path) -> int:
    """Bytes under the folders, as far as they can be read while the test writes and removes files."""
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:  # renamed or removed meanwhile (atomic writes, pytest's clean-up)
                    pass
    return total


def run_key_mutation(stage: str, key: str, scratch: Path, wrong_way: bool = False) -> tuple[bool, float, str]:
    """The key's test with the stage reading the key's default (tests/test_settings.py), or its value the wrong way
    round (tests/test_contracts.py). A test that runs over KEY_TIMEOUT or writes over KEY_DISK (in its basetemp, or in
    results/ of the scratch folder, where a stage reading output_dir as its default writes) is stopped with every
    process it started: the defect shows (the mutated stage runs far longer than the unmutated one)."""
    env = {**os.environ, "PYTHONPATH": f"{scratch / 'inject'}:{scratch / 'src'}", "OMP_NUM_THREADS": "2",
           "SPEEDPIPE_KEY_MUTATION": f"{stage}:{key}" + (":wrong" if wrong_way else ""),
           "SPEEDPIPE_SETTINGS_INPUTS": str(scratch / "inputs")}
    node = (f"tests/test_contracts.py::test_a_stage_passes_a_directional_setting_as_given[{stage}:{key}]" if wrong_way else
            f"tests/test_settings.py::test_a_setting_changes_what_its_stage_writes[{stage}:{key}]")
    basetemp, stray = scratch / "basetemp", scratch / "results"
    start, stopped = time.time(), None
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a long report cannot block the test
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
                                 node], cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and stopped is None:
                time.sleep(1)
                if time.time() - start > KEY_TIMEOUT:  # e.g. trainer.steps read as its default: 400,000 steps
                    stopped = f"timeout: the test ran over {KEY_TIMEOUT} s (it takes seconds unmutated)"
                elif _size(basetemp, stray) > KEY_DISK:
                    stopped = f"the test wrote over {KEY_DISK >> 30} GiB (a few MB unmutated)"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            shutil.rmtree(basetemp, ignore_errors=True)
            shutil.rmtree(stray, ignore_errors=True)
        out.seek(0)
        output = out.read()
    if stopped:
        return True, time.time() - start, stopped
    if proc.returncode == 5:
        raise SystemExit(f"no test {node}")
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode != 0, time.time() - start, failed[0] if failed else output.strip().splitlines()[-1]


def run_mutation(name, rel, mutate, tests, scratch: Path) -> tuple[bool, float, str]:
    """The tests on a copy of src/ whose module `rel` is mutate(its text)."""
    target = scratch / "src" / "speedpipe" / rel
    original = target.read_text()
    target.write_text(mutate(original))
    try:
        env = {**os.environ, "PYTHONPATH": str(scratch / "src"), "OMP_NUM_THREADS": "2"}
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=scratch, env=env, capture_output=True, text=True)
        if result.returncode in (4, 5):  # a usage error or no test: the covering tests are misnamed, nothing was judged
            raise SystemExit(f"mutation {name!r}: pytest could not run {tests}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED") or line.startswith("ERROR")]
        return result.returncode != 0, time.time() - start, failed[0] if failed else ""
    finally:
        target.write_text(original)


def replace_once(name, old, new):
    def mutate(text):
        if text.count(old) != 1:
            raise SystemExit(f"mutation {name!r}: the text to mutate occurs {text.count(old)} times")
        return text.replace(old, new)
    return mutate


def setting_mutations() -> tuple[list[tuple[str, str]], dict[tuple[str, str], str], list[tuple[str, str]]]:
    """(stage, key) of every key the registry says a stage reads, the keys with no test (with the reason), and the
    directional keys (tests/test_contracts.py's PLUMBING) whose wrong-way-round use is mutated too."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_contracts import PLUMBING
    from test_settings import NOT_ON_CPU, NOT_RUN, READ

    listed = {**{sk: f"not pinnable on CPU: {why}" for sk, why in NOT_ON_CPU.items()},
              **{(s, k): f"not pinned: {NOT_RUN[k]}" for s, k in READ if k in NOT_RUN}}
    return READ, listed, [(p[0], p[1]) for p in PLUMBING]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="run only mutations whose name contains this text "
                                                                 "(given again: any of the texts)")
    ap.add_argument("--keys", action="store_true", help="run the setting mutations only")
    ap.add_argument("--mechanical", action="store_true", help="run the literal and operator mutants of the formula modules only")
    ap.add_argument("--list", action="store_true", help="list the mutations that would run, and stop")
    args = ap.parse_args()
    chosen = lambda name: not args.only or any(text in name for text in args.only)  # noqa: E731
    formulas = [] if args.keys or args.mechanical else [(n, rel, replace_once(n, old, new), tests) for n, rel, old, new, tests in MUTATIONS
                                                         if chosen(n)]
    if args.mechanical:
        for rel, tests in FORMULA_MODULES.items():
            source = (REPO / "src" / "speedpipe" / rel).read_text()
            formulas += [(name, rel, lambda text, a=a, b=b, new=new: text[:a] + new + text[b:], tests)
                         for name, a, b, new in mechanical_mutations(rel, source) if chosen(name)]
    keys, unpinnable, directional = ([], {}, []) if args.mechanical else setting_mutations()
    if args.list:
        print("\n".join([f[0] for f in formulas] + [f"{s}:{k}" for s, k in keys] + [f"{s}:{k} (wrong way round)" for s, k in directional]))
        return
    keys = [(s, k) for s, k in keys if chosen(f"{s}:{k}")]
    directional = [(s, k) for s, k in directional if chosen(f"{s}:{k}")]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shutil.copytree(REPO / "src", scratch / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        shutil.copytree(REPO / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for entry in ("main.py", "configs", "workflow", "Snakefile"):
            (shutil.copytree if (REPO / entry).is_dir() else shutil.copy)(REPO / entry, scratch / entry)
        (scratch / "inject").mkdir()
        (scratch / "inject" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if keys or directional:  # the settings tests' inputs, made once by the unchanged code (its check of the cases, too)
            made = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "tests/test_settings.py::test_every_read_key_has_a_case",
                                   "tests/test_settings.py::test_a_setting_changes_what_its_stage_writes[train:seed]"],
                                  cwd=scratch, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(scratch / "src"), "SPEEDPIPE_SETTINGS_INPUTS": str(scratch / "inputs")})
            if made.returncode != 0:
                raise SystemExit(f"the settings tests fail without a mutation:\n{made.stdout[-3000:]}")
        for tests in {tuple(f[3]) for f in formulas}:  # each set of covering tests passes unmutated, or no mutant is judged
            caught, _, by = run_mutation("none", "__init__.py", lambda text: text, list(tests), scratch)
            if caught:
                raise SystemExit(f"the covering tests {list(tests)} fail without a mutation: {by}")
        killed, by_module, equivalent = 0, {}, 0
        for name, rel, mutate, tests in formulas:
            if name in EQUIVALENT:
                equivalent += 1
                by_module.setdefault(f"formulas {rel}", []).append(None)
                print(f"equivalent  --   {name}: {EQUIVALENT[name]}", flush=True)
                continue
            caught, seconds, by = run_mutation(name, rel, mutate, tests, scratch)
            killed += caught
            by_module.setdefault(f"formulas {rel}", []).append(caught)
            print(f"{'killed  ' if caught else 'SURVIVED'} {seconds:6.1f}s  {name:55s} {by[:90]}", flush=True)
        unpinned = []
        for stage, key in keys:
            if (stage, key) in unpinnable:
                print(f"{'listed  '}    --   {stage + ':' + key:55s} {unpinnable[(stage, key)][:90]}", flush=True)
                by_module.setdefault(f"settings {stage}", []).append(None)
                continue
            caught, seconds, by = run_key_mutation(stage, key, scratch)
            killed += caught
            by_module.setdefault(f"settings {stage}", []).append(caught)
            unpinned += [] if caught else [f"{stage}:{key}"]
            print(f"{'killed  ' if caught else 'SURVIVED'} {seconds:6.1f}s  {stage + ':' + key + ' read as its default':55s} {by[:90]}",
                  flush=True)
        for stage, key in directional:
            caught, seconds, by = run_key_mutation(stage, key, scratch, wrong_way=True)
            killed += caught
            by_module.setdefault(f"settings {stage} (wrong way round)", []).append(caught)
            unpinned += [] if caught else [f"{stage}:{key} (wrong way round)"]
            print(f"{'killed  ' if caught else 'SURVIVED'} {seconds:6.1f}s  {stage + ':' + key + ' the wrong way round':55s} {by[:90]}",
                  flush=True)
    run = len(formulas) - equivalent + sum(1 for s, k in keys if (s, k) not in unpinnable) + len(directional)
    print(f"\n{killed} of {run} mutations killed ({killed / max(run, 1):.0%}) in {(time.time() - started) / 60:.1f} min; "
          f"{sum(1 for s, k in keys if (s, k) in unpinnable)} setting(s) and {equivalent} equivalent mutant(s) listed without a run")
    print("\n| module | killed | run | listed |\n|---|---|---|---|")
    for module, results in by_module.items():
        print(f"| {module} | {sum(1 for r in results if r)} | {sum(1 for r in results if r is not None)} | "
              f"{sum(1 for r in results if r is None)} |")
    if unpinned:
        print("\nkeys no test pins: " + ", ".join(unpinned))


if __name__ == "__main__":
    main()
