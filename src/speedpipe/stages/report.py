"""Stage `report`: the papers' tables and figures from the metrics files and training logs.

Tables (CSV, Markdown, LaTeX): FID, label accuracy, KID, IS, precision and recall per method and iteration
(mean ± std over seeds); SpeeD's iteration speed-up at the baseline's final FID; the teacher's samplers; sCM
versus its teacher (its reference sampler and its ODE ceiling) over the distillation checkpoints. Figures (PNG
and PDF): FID curves with seed bands, training losses, timestep distributions and weights per method, sample
grids with one row per class, the distillation curve. A generated README.md says what was run.
"""
import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from speedpipe.config import named_params  # noqa: E402
from speedpipe.diffusion import create_diffusion  # noqa: E402
from speedpipe.diffusion.timesteps import build_sampler, build_weighting  # noqa: E402
from speedpipe.io import atomic_path, atomic_write_text  # noqa: E402

METRIC_KEYS = {"frechet_inception_distance": "FID", "label_accuracy": "label acc.", "kernel_inception_distance_mean": "KID",
               "inception_score_mean": "IS", "precision": "precision", "recall": "recall"}
CURVE_METRICS = ["FID", "label acc.", "KID", "IS", "precision", "recall"]


def load_metrics(root: Path, evaluations) -> pd.DataFrame:
    rows = []
    for run, step, sampler in evaluations:
        m = json.loads((root / "metrics" / run / f"{int(step):07d}" / f"{sampler}.json").read_text())
        method, seed = (run.rsplit("-s", 1)[0], int(run.rsplit("-s", 1)[1])) if not run.startswith("scm-") else ("sCM", 0)
        rows.append({"run": run, "method": method, "seed": seed, "step": int(step), "sampler": sampler,
                     **{v: m["metrics"].get(k, np.nan) for k, v in METRIC_KEYS.items()},
                     "num_samples": m["num_samples"], "nfe": m["nfe_per_image"], "seconds_per_image": m["seconds_per_image"],
                     "reference": m["reference"]["source"], "extractor": m["extractor"]})
    return pd.DataFrame(rows)


def write_table(df: pd.DataFrame, root: Path, name: str, caption: str):
    """The same table as CSV, Markdown (with the caption above it) and LaTeX."""
    with atomic_path(root / "tables" / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    atomic_write_text(root / "tables" / f"{name}.md", f"{caption}\n\n{df.to_markdown(index=False)}\n")
    atomic_write_text(root / "tables" / f"{name}.tex", df.to_latex(index=False, caption=caption, float_format="%.3f"))


def mean_std(series) -> str:
    return f"{series.mean():.2f} ± {series.std(ddof=0):.2f}" if len(series) > 1 else f"{series.mean():.2f}"


def crossing_step(steps, fids, target):
    """First iteration at which the (linearly interpolated) FID curve reaches target, or None."""
    if fids[0] <= target:
        return float(steps[0])
    for (s0, f0), (s1, f1) in zip(zip(steps, fids), zip(steps[1:], fids[1:])):
        if f1 <= target:
            return s0 + (f0 - target) / (f0 - f1) * (s1 - s0)
    return None


def save_figure(fig, root: Path, name: str):
    for ext in ("png", "pdf"):
        with atomic_path(root / "figures" / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=100, bbox_inches="tight")
    plt.close(fig)


def show_grid(ax, path: Path, title: str):
    """A sample stage's class-row grid, its rows labelled with the class they were generated for."""
    image = plt.imread(path)
    rows = 10
    ax.imshow(image)
    ax.set(title=title, xticks=[], yticks=[(r + 0.5) * image.shape[0] / rows for r in range(rows)], yticklabels=range(rows))
    ax.tick_params(axis="y", length=0, labelsize=7)


def scm_table(df, cfg) -> pd.DataFrame:
    """Teacher samplers and the student's 1- and 2-step FID at each distill checkpoint, as ratios to the teacher's
    reference sampler and to its ODE ceiling."""
    pipe = cfg["pipeline"]
    teacher = df[(df.run == pipe["teacher"]) & (df.step == pipe["train_steps"])].set_index("sampler")
    ref, ode = teacher.loc[pipe["teacher_sampler"]], teacher.loc[pipe["teacher_ode_sampler"]]
    rows = [{"model": f"teacher {pipe['teacher']}", "sampler": s, "step": pipe["train_steps"], **_scm_row(teacher.loc[s], ref, ode)}
            for s in cfg["teacher_samplers"]]
    warm = pipe["distill_warm_start"]
    student = df[df.run == cfg["student"]].sort_values(["step", "sampler"])
    for _, r in student.iterrows():
        stage = "warm start only" if r.step == warm else f"sCD {r.step - warm} steps"
        rows.append({"model": f"student ({stage})", "sampler": r.sampler, "step": r.step, **_scm_row(r, ref, ode)})
    return pd.DataFrame(rows)


def _scm_row(r, ref, ode) -> dict:
    return {"NFE": int(r.nfe), "FID": round(r.FID, 3), "label acc.": round(r["label acc."], 3),
            "FID / teacher": round(r.FID / ref.FID, 3), "FID / ODE": round(r.FID / ode.FID, 3),
            "s/image": round(r.seconds_per_image, 5), "sampling speed-up": round(ref.seconds_per_image / r.seconds_per_image, 1)}


def run(cfg):
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    pipe, root = cfg["pipeline"], Path(cfg["root"])
    df = load_metrics(root, cfg["evaluations"])
    curve = df[(df.sampler == pipe["curve_sampler"]) & (df.method != "sCM") & df.step.isin(pipe["eval_steps"])]
    methods = list(pipe["methods"])

    # --- FID per method and step (mean ± std over seeds)
    write_table(curve.sort_values(["method", "step", "seed"]), root, "metrics",
                f"All metrics, {pipe['curve_sampler']}, {pipe['curve_samples']} samples, {pipe['extractor']} features.")
    grouped = curve.groupby(["method", "step"])
    fid_table = grouped.agg(**{m: (m, mean_std) for m in CURVE_METRICS}).reset_index()
    write_table(fid_table, root, "fid", f"FID and other metrics (mean ± std over seeds {pipe['seeds']}); sampler "
                f"{pipe['curve_sampler']}, {pipe['curve_samples']} samples vs the {pipe['extractor']} reference of the full dataset.")

    # --- speed-up: iterations SpeeD needs to reach the baseline's final FID
    means = grouped.FID.mean().unstack(0).sort_index()
    rows = []
    if "baseline" in means:
        target = means["baseline"].iloc[-1]
        for m in methods:
            if m == "baseline":
                continue
            reached = crossing_step(list(means.index), list(means[m]), target)
            rows.append({"method": m, "baseline final FID": round(target, 3), "baseline iterations": int(means.index[-1]),
                         "iterations to reach it": None if reached is None else round(reached),
                         "speed-up": None if reached is None else round(means.index[-1] / reached, 2)})
    speedup = pd.DataFrame(rows)
    write_table(speedup, root, "speedup", "Iterations needed to reach the baseline's final FID (linear interpolation of the "
                "mean FID curves); speed-up = baseline iterations / those iterations.")

    # --- sCM versus its teacher
    scm = scm_table(df, cfg)
    write_table(scm, root, "scm", f"sCM versus its teacher ({pipe['extractor']} features, {pipe['final_samples']} samples each, "
                f"same reference): FID / teacher against the teacher's {pipe['teacher_sampler']}, FID / ODE against its "
                f"probability-flow ODE ({pipe['teacher_ode_sampler']}), the ceiling of a converged consistency model.")

    # --- figures
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        per_step = curve[curve.method == m].groupby("step").FID
        ax.plot(per_step.mean().index, per_step.mean(), marker="o", label=m)
        ax.fill_between(per_step.mean().index, per_step.min(), per_step.max(), alpha=0.2)
    ax.set(xlabel="training iterations", ylabel=f"FID ({pipe['extractor']}, {pipe['curve_samples']} samples)",
           title=f"FID vs iterations ({pipe['curve_sampler']}, seeds {pipe['seeds']})", yscale="log")
    ax.legend()
    save_figure(fig, root, "fid_vs_iterations")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m in methods:
        logs = [pd.read_csv(root / "train" / f"{m}-s{s}" / "log.csv") for s in pipe["seeds"]]
        mean = pd.concat(logs).groupby("step").mean(numeric_only=True)
        axes[0].plot(mean.index, mean["loss"], label=m)
        axes[1].plot(mean.index, mean["mse"], label=m)
    axes[0].set(xlabel="iteration", ylabel="weighted loss", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="MSE term (unweighted)", yscale="log")
    axes[0].legend()
    save_figure(fig, root, "training_loss")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m, dcfg in cfg["diffusion"].items():
        diffusion = create_diffusion(noise_schedule=dcfg["noise_schedule"], diffusion_steps=dcfg["diffusion_steps"])
        sampler = build_sampler(dcfg["timestep_sampler"]["name"], diffusion, **named_params(dcfg["timestep_sampler"]))
        weights = build_weighting(dcfg["loss_weighting"]["name"], diffusion, **named_params(dcfg["loss_weighting"]))
        axes[0].plot(sampler.distribution(cfg["train_config"]["trainer"]["global_batch_size"]).numpy(), label=m)
        axes[1].plot(weights.numpy(), label=m)
    axes[0].set(xlabel="timestep t", ylabel="sampling probability", title="timestep sampling")
    axes[1].set(xlabel="timestep t", ylabel="MSE weight w_t", title="loss weighting")
    axes[0].legend()
    save_figure(fig, root, "timestep_methods")

    steps = pipe["eval_steps"]
    fig, axes = plt.subplots(len(methods), len(steps), figsize=(2.2 * len(steps), 2.4 * len(methods)), squeeze=False)
    for i, m in enumerate(methods):
        for j, s in enumerate(steps):
            show_grid(axes[i][j], root / "samples" / f"{m}-s{pipe['seeds'][0]}" / f"{s:07d}" / f"{pipe['curve_sampler']}.png",
                      f"{m}, {s} it")
    save_figure(fig, root, "samples_per_method")

    final = pipe["train_steps"]
    teacher_panels = [(pipe["teacher"], final, s) for s in (pipe["teacher_sampler"], pipe["curve_sampler"])]
    last = max(pipe["distill_eval_steps"])
    scm_panels = [(pipe["teacher"], final, pipe["teacher_sampler"]), (pipe["teacher"], final, pipe["teacher_ode_sampler"]),
                  *[(pipe["teacher"], final, s) for s in pipe["teacher_baselines"] if s.startswith("ddim2")],
                  *[(cfg["student"], last, s) for s in pipe["scm_samplers"]]]
    for name, panels in (("teacher_grid", teacher_panels), ("teacher_vs_scm", scm_panels)):
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
        for ax, (run_, step, sampler) in zip(np.atleast_1d(axes), panels):
            label = "sCM" if run_.startswith("scm-") else "teacher"
            acc = df[(df.run == run_) & (df.step == step) & (df.sampler == sampler)]["label acc."]
            title = f"{label} {sampler}" + (f"\nlabel acc. {acc.iloc[0]:.2f}" if len(acc) and np.isfinite(acc.iloc[0]) else "")
            show_grid(ax, root / "samples" / run_ / f"{step:07d}" / f"{sampler}.png", title)
        save_figure(fig, root, name)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    student = df[df.run == cfg["student"]]
    for sampler in pipe["scm_samplers"]:
        s = student[student.sampler == sampler].sort_values("step")
        ax.plot(s.step - pipe["distill_warm_start"], s.FID, marker="o", label=f"student {sampler}")
    teacher = df[(df.run == pipe["teacher"]) & (df.step == pipe["train_steps"])].set_index("sampler")
    for k, sampler in enumerate(cfg["teacher_samplers"]):
        ax.axhline(teacher.loc[sampler].FID, ls="--", lw=1, color=f"C{k + 2}", label=f"teacher {sampler}")
    ax.set(xlabel="sCD steps after the warm start", ylabel=f"FID ({pipe['final_samples']} samples)", yscale="log",
           title="distillation")
    ax.legend(fontsize=7)
    save_figure(fig, root, "distillation")

    atomic_write_text(root / "README.md", experiment_readme(cfg, fid_table, speedup, scm, df))
    return root


def experiment_readme(cfg, fid_table, speedup, scm, df) -> str:
    import diffusers
    import snakemake
    import torch_fidelity

    pipe, d = cfg["pipeline"], cfg["distill_config"]
    ref = df.reference.iloc[0]
    return f"""# Experiment `{pipe['experiment']}`

Generated by `speedpipe report`. Everything below was measured by this pipeline run.

- Methods: {', '.join(f"`{m}` ({p})" for m, p in pipe['methods'].items())}; seeds {pipe['seeds']}; {pipe['train_steps']} training iterations.
- Evaluation: {pipe['extractor']} features via torch-fidelity; reference `{ref}` (real images of the dataset);
  FID curves with `{pipe['curve_sampler']}` on {pipe['curve_samples']} samples per point; teacher vs sCM on {pipe['final_samples']} samples.
  Label accuracy: the fraction of samples the dataset's classifier assigns to the label they were generated for.
- sCD: teacher `{pipe['teacher']}` at {pipe['train_steps']} iterations (guidance {d['cfg_scale']}), a {pipe['distill_warm_start']}-step
  TrigFlow warm start then {pipe['distill_steps']} sCD steps (σ_d = {d['sigma_d']}, P_mean = {d['p_mean']}, P_std = {d['p_std']}, lr {d['lr']}).
- Software: Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__},
  torch-fidelity {torch_fidelity.__version__}, snakemake {snakemake.__version__}; machine {platform.machine()}, {torch.get_num_threads()} threads.

## FID per method and iteration

![FID against iterations](figures/fid_vs_iterations.png)

{fid_table.to_markdown(index=False)}

## Speed-up (iterations to reach the baseline's final FID)

{speedup.to_markdown(index=False) if len(speedup) else 'no baseline in this experiment'}

## The teacher

![teacher samples, one row per class](figures/teacher_grid.png)

## sCM versus teacher

![distillation curve](figures/distillation.png)

![teacher and sCM samples, one row per class](figures/teacher_vs_scm.png)

{scm.to_markdown(index=False)}

Figures: `figures/fid_vs_iterations.png`, `figures/training_loss.png`, `figures/timestep_methods.png`,
`figures/samples_per_method.png`, `figures/teacher_grid.png`, `figures/teacher_vs_scm.png`, `figures/distillation.png`.
Tables as CSV/Markdown/LaTeX in `tables/`.

## Experiment file

```yaml
{json.dumps(pipe, indent=2)}
```
"""
