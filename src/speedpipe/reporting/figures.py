"""The report's figures (PNG and PDF): FID against iterations with seed bands, the speed-up against the budget, the
training losses, the timestep methods, sample grids with one row per class, the distillation curves."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from speedpipe.config import named_params  # noqa: E402
from speedpipe.diffusion import create_diffusion  # noqa: E402
from speedpipe.diffusion.timesteps import build_sampler, build_weighting  # noqa: E402
from speedpipe.io import atomic_path  # noqa: E402
from speedpipe.layout import Layout  # noqa: E402
from speedpipe.uncertainty import LEVEL  # noqa: E402

def save_figure(fig, layout: Layout, name: str):
    for ext in ("png", "pdf"):
        with atomic_path(layout.figure(name, ext)) as tmp:
            fig.savefig(tmp, format=ext, dpi=100, bbox_inches="tight")
    plt.close(fig)


def show_grid(ax, path, title: str, rows: int):
    """A sample stage's class-row grid (rows = min(10, classes)), its rows labelled with the class they were generated for."""
    image = plt.imread(path)
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.set(xticks=[], yticks=[(r + 0.5) * image.shape[0] / rows for r in range(rows)], yticklabels=range(rows))
    ax.tick_params(axis="y", length=0, labelsize=7)


def budget_figure(budgets: pd.DataFrame, reference: str) -> plt.Figure:
    """The speed-up against the budget (log axis): per method the mean over seeds with its t-interval as an error bar
    (where every seed's crossing is interpolated), and the mean curve's speed-up; 1 = the reference's own speed."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (m, rows) in enumerate(budgets.groupby("method", sort=False)):
        color = f"C{i + 1}"
        ax.plot(rows.budget, rows["speed-up"], ls="--", lw=1, color=color, label=f"{m}: mean curve")
        exact = rows[rows[f"speed-up {LEVEL:.0%} t-interval"].str.fullmatch(r"[\d.]+-[\d.]+")]
        if len(exact):
            bounds = exact[f"speed-up {LEVEL:.0%} t-interval"].str.split("-", expand=True).astype(float)
            mean = exact["speed-up mean over seeds"]
            ax.errorbar(exact.budget, mean, yerr=[mean - bounds[0], bounds[1] - mean], fmt="o", ms=4, capsize=3, color=color,
                        label=f"{m}: mean over seeds, {LEVEL:.0%} t-interval")
    ax.axhline(1.0, color="gray", lw=1, label=f"{reference} (1x)")
    ax.set(xscale="log", xlabel="training budget B (iterations of the reference)",
           ylabel=f"speed-up at the {reference}'s FID at B", title="Speed-up against the training budget")
    _tick_at(ax, sorted(budgets.budget.unique()))
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return fig


def fid_figure(curve: pd.DataFrame, methods, reference, pipe, speedup: pd.DataFrame, log_steps: bool = False) -> plt.Figure:
    """FID against iterations (a log axis for a budget study): the mean over seeds, a band from the best to the worst
    seed; the legend gives each method's speed-up against the reference with its interval over seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rows = speedup.set_index("method")
    for m in methods:
        per_step = curve[curve.method == m].groupby("step").FID
        label = m
        if reference and m != reference:
            value = rows.loc[m, "speed-up"]
            label = f"{m}: {'not reached' if pd.isna(value) else f'{value}x'} ({LEVEL:.0%} CI {rows.loc[m, f'speed-up {LEVEL:.0%} t-interval']})"
        ax.plot(per_step.mean().index, per_step.mean(), marker="o", ms=3, label=label)
        ax.fill_between(per_step.mean().index, per_step.min(), per_step.max(), alpha=0.2)
    if reference:
        ax.axhline(curve[curve.method == reference].groupby("step").FID.mean().iloc[-1], ls="--", lw=1, color="gray",
                   label=f"{reference} final")
    ax.set(xlabel="training iterations", ylabel=f"FID ({pipe['extractor']}, {pipe['curve_samples']} samples)",
           title=f"FID vs iterations ({pipe['curve_sampler']}, seeds {pipe['seeds']})", yscale="log",
           xscale="log" if log_steps else "linear")
    if log_steps:
        _tick_at(ax, sorted(curve.step.unique()))
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below the axes: the curves stay visible
    return fig


def _tick_at(ax, steps):
    """A log x axis labelled at the evaluated iterations only (matplotlib's minor labels overlap on a short decade)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(steps, [f"{s:,}" for s in steps])
    ax.xaxis.set_minor_formatter(NullFormatter())


def grid_panels(df, layout: Layout, name: str, rows: list[list[tuple[str, int, str, str]]], classes: int):
    """A figure of sample grids: one row of panels per list of (run, step, sampler, label)."""
    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(2.6 * width, 2.9 * len(rows)), squeeze=False)
    for i, panels in enumerate(rows):
        for j in range(width):
            if j >= len(panels):
                axes[i][j].axis("off")
                continue
            run_, step, sampler, label = panels[j]
            e = df[(df.run == run_) & (df.step == step) & (df.sampler == sampler)].iloc[0]
            acc = e["label acc."]
            show_grid(axes[i][j], e.grid, f"{label}\n{sampler}" + (f", label acc. {acc:.2f}" if np.isfinite(acc) else ""),
                      rows=min(10, classes))
    save_figure(fig, layout, name)

def training_loss_figure(train_runs, methods) -> plt.Figure:
    """The weighted loss and its unweighted MSE term against iterations, the mean over each method's seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    logs = pd.concat([pd.read_csv(r["log"]).assign(method=r["method"]) for r in train_runs])
    for m in methods:
        mean = logs[logs.method == m].groupby("step").mean(numeric_only=True)
        axes[0].plot(mean.index, mean["loss"], label=m)
        axes[1].plot(mean.index, mean["mse"], label=m)
    axes[0].set(xlabel="iteration", ylabel="weighted loss", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="MSE term (unweighted)", yscale="log")
    axes[0].legend(fontsize=7, ncol=2 if len(methods) > 6 else 1)
    return fig


def timestep_methods_figure(cfg, methods) -> plt.Figure:
    """Each method's timestep distribution (a curriculum's at the last step) and loss weights, built from its config."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m, dcfg in cfg["diffusion"].items():
        diffusion = create_diffusion(noise_schedule=dcfg["noise_schedule"], diffusion_steps=dcfg["diffusion_steps"])
        sampler = build_sampler(dcfg["timestep_sampler"]["name"], diffusion, **named_params(dcfg["timestep_sampler"]))
        weights = build_weighting(dcfg["loss_weighting"]["name"], diffusion, **named_params(dcfg["loss_weighting"]))
        axes[0].plot(sampler.distribution(cfg["train"]["global_batch_size"], step=cfg["pipeline"]["train_steps"]).numpy(), label=m)
        axes[1].plot(weights.numpy(), label=m)
    axes[0].set(xlabel="timestep t", ylabel="sampling probability", title="timestep sampling")
    axes[1].set(xlabel="timestep t", ylabel="MSE weight w_t", title="loss weighting")
    axes[0].legend(fontsize=7, ncol=2 if len(methods) > 6 else 1)
    return fig


def distillation_figure(df, cfg, by_teacher) -> plt.Figure:
    """Per teacher: each student's FID against its consistency steps, the teacher's samplers as horizontal lines (a
    panel of the students without a teacher has none)."""
    pipe, final = cfg["pipeline"], cfg["pipeline"]["train_steps"]
    fig, axes = plt.subplots(1, len(by_teacher), figsize=(5.5 * len(by_teacher), 3.5), squeeze=False)
    for ax, (t, students) in zip(axes[0], by_teacher.items()):
        for d in students:
            for sampler in pipe["scm_samplers"]:
                s = df[(df.run == d["name"]) & (df.sampler == sampler)].sort_values("step")
                ax.plot(s.step - pipe["distill_warm_start"], s.FID, marker="o", label=f"{d['title']} {sampler}")
        teacher = df[(df.run == t) & (df.step == final)].set_index("sampler")
        for k, sampler in enumerate(cfg["teacher_samplers"] if t is not None else []):
            ax.axhline(teacher.loc[sampler].FID, ls="--", lw=1, color=f"C{k + 2 * len(students)}", label=f"teacher {sampler}")
        ax.set(xlabel="consistency steps after the warm start", ylabel=f"FID ({pipe['final_samples']} samples)", yscale="log",
               title=f"consistency models of {t}" if t is not None else "consistency models without a teacher")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
