"""Stage `report`: the papers' tables and figures from the metrics files and training logs.

Tables (CSV, Markdown, LaTeX): for each named table of the experiment file, FID, label accuracy, KID, IS,
precision and recall of its methods at its iterations (mean ± std over seeds) and each method's iteration
speed-up at the reference method's final FID; every metric of every run; the consistency models (one per method,
speedpipe.consistency.methods) versus each teacher (its reference sampler and its ODE ceiling) over their checkpoints. Figures (PNG and PDF): FID curves with seed
bands per named table, training losses, timestep distributions and weights per method, sample grids with one
row per class, the distillation curves. A generated README.md says what was run.
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

from speedpipe import runstore  # noqa: E402
from speedpipe.config import named_params  # noqa: E402
from speedpipe.consistency.methods import consistency_method  # noqa: E402
from speedpipe.diffusion import create_diffusion  # noqa: E402
from speedpipe.diffusion.timesteps import build_sampler, build_weighting  # noqa: E402
from speedpipe.io import atomic_path, atomic_write_text  # noqa: E402
from speedpipe.layout import Layout  # noqa: E402
from speedpipe.sampler_labels import parse_sampler  # noqa: E402
from speedpipe.stages import STAGES  # noqa: E402
from speedpipe.uncertainty import LEVEL, budget_speedups, crossing, paired_difference, seed_speedups  # noqa: E402

METRIC_KEYS = {"frechet_inception_distance": "FID", "label_accuracy": "label acc.", "kernel_inception_distance_mean": "KID",
               "inception_score_mean": "IS", "precision": "precision", "recall": "recall"}
CURVE_METRICS = ["FID", "label acc.", "KID", "IS", "precision", "recall"]


def load_metrics(evaluations) -> pd.DataFrame:
    """One row per evaluation (the report config's list: run, kind, method, seed, step, sampler, metrics path)."""
    rows = []
    for e in evaluations:
        m = json.loads(Path(e["metrics"]).read_text())
        rows.append({"run": e["run"], "kind": e["kind"], "method": e["method"], "seed": e["seed"], "step": int(e["step"]),
                     "sampler": e["sampler"], **{v: m["metrics"].get(k, np.nan) for k, v in METRIC_KEYS.items()},
                     "num_samples": m["num_samples"], "nfe": m["nfe_per_image"], "seconds_per_image": m["seconds_per_image"],
                     "reference": m["reference"]["source"], "extractor": m["extractor"], "grid": e["grid"]})
    return pd.DataFrame(rows)


def without_empty_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The table without the columns no evaluation has a value for (label accuracy of an unconditional model, a metric
    the sample count could not support): they are left out, never printed as "nan"."""
    empty = [c for c in df.columns if df[c].isna().all() or (df[c].astype(str) == "nan").all()]
    return df.drop(columns=empty)


def as_markdown(df: pd.DataFrame) -> str:
    """A frame as a Markdown table, a missing value (a speed-up never reached, an interval of one seed) shown as "–"."""
    return df.astype(object).where(df.notna(), "–").to_markdown(index=False)


def write_table(layout: Layout, name: str, caption: str, *parts: tuple[str, str, pd.DataFrame]):
    """A table as CSV (one file per part: {name}{suffix}.csv), Markdown and LaTeX (every part, the caption above),
    without its empty columns. parts: (file name suffix, title, frame)."""
    markdown, latex = [caption], []
    for suffix, title, df in parts:
        df = without_empty_columns(df)
        with atomic_path(layout.table(name + suffix, "csv")) as tmp:
            df.to_csv(tmp, index=False)
        markdown.append((f"**{title}**\n\n" if title else "") + as_markdown(df))
        latex.append(df.to_latex(index=False, caption=f"{caption} {title}".strip(), float_format="%.3f", escape=True))
    atomic_write_text(layout.table(name, "md"), "\n\n".join(markdown) + "\n")
    atomic_write_text(layout.table(name, "tex"), "\n".join(latex))


def mean_std(series) -> str:
    """'mean ± std' over seeds ('nan' when no run has the value: without_empty_columns then drops the column)."""
    if series.isna().all():
        return "nan"
    return f"{series.mean():.2f} ± {series.std(ddof=0):.2f}" if len(series) > 1 else f"{series.mean():.2f}"


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


def named_table(curve: pd.DataFrame, table: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(metrics per method at the table's iterations, mean ± std over seeds; each method's final values and the
    iterations it needs to reach the reference method's final FID -- read from the mean curve over all eval steps, and
    seed by seed with the t-interval of the mean (speedpipe.uncertainty); each method's FID minus the reference's at the
    table's iterations, paired by seed, with its t-interval)."""
    rows = curve[curve.method.isin(table["methods"])]
    order = {m: i for i, m in enumerate(table["methods"])}
    at_steps = rows[rows.step.isin(table["steps"])].groupby(["method", "step"])
    metrics = at_steps.agg(**{m: (m, mean_std) for m in CURVE_METRICS}).reset_index()
    metrics = metrics.sort_values(["method", "step"], key=lambda c: c.map(order) if c.name == "method" else c)
    means = rows.groupby(["method", "step"]).FID.mean().unstack(0).sort_index()
    final = rows[rows.step == rows.step.max()].groupby("method")
    reference = table["reference"]
    speedup, differences = [], []
    for m in table["methods"]:
        row = {"method": m, "final FID": mean_std(final.get_group(m).FID), "final label acc.": mean_std(final.get_group(m)["label acc."])}
        if reference:
            target, last = means[reference].iloc[-1], float(means.index[-1])
            reached, how = (last, "reference") if m == reference else crossing(list(means.index), list(means[m]), target)
            seeds = seed_speedups(_seed_curves(rows, m), _seed_curves(rows, reference, final=True), last)
            row.update({"reference final FID": round(target, 3), "iterations to reach it": None if reached is None else round(reached),
                        "reached": how, "speed-up": None if reached is None else round(last / reached, 2),
                        f"speed-up {LEVEL:.0%} t-interval": seeds.interval_text(), "speed-up by seed": seeds.summary(),
                        "separable from the reference": "-" if m == reference else seeds.separable()})
            if m != reference:
                for step in table["steps"]:
                    at = lambda method: rows[(rows.method == method) & (rows.step == step)].set_index("seed").FID.to_dict()  # noqa: E731
                    mean, interval, n = paired_difference(at(m), at(reference))
                    differences.append({"method": m, "step": step, "FID - reference": round(mean, 3),
                                        f"{LEVEL:.0%} t-interval": "n = 1, no interval" if interval is None else
                                        f"{interval[0]:.2f} to {interval[1]:.2f}",
                                        "resolved": "n = 1, no interval" if interval is None else
                                        ("yes" if interval[0] > 0 or interval[1] < 0 else "no"), "seeds": n})
        speedup.append(row)
    return metrics, pd.DataFrame(speedup), pd.DataFrame(differences)


def budget_table(curve: pd.DataFrame, table: dict) -> pd.DataFrame:
    """The speed-up as a function of the training budget: for every evaluated iteration B and every method but the
    reference, the iterations the method needs to reach the reference's FID at B -- from the mean curves, and seed by
    seed against the same seed's reference FID at B, with the t-interval of the mean (speedpipe.uncertainty)."""
    rows = curve[curve.method.isin(table["methods"])]
    means = rows.groupby(["method", "step"]).FID.mean().unstack(0).sort_index()
    reference, budgets = table["reference"], [int(b) for b in means.index]
    out = []
    for m in table["methods"]:
        if m == reference:
            continue
        by_seed = budget_speedups(_seed_curves(rows, m), _seed_curves(rows, reference), budgets)
        for budget in budgets:
            target = means.loc[budget, reference]
            reached, how = crossing(list(means.index), list(means[m]), target)
            seeds = by_seed[budget]
            mean_sd = seeds.mean_sd()
            out.append({"method": m, "budget": budget, "reference FID at budget": round(target, 3),
                        "iterations to reach it": None if reached is None else round(reached), "reached": how,
                        "speed-up": None if reached is None else round(budget / reached, 2),
                        "speed-up mean over seeds": None if mean_sd is None else round(mean_sd[0], 2),
                        f"speed-up {LEVEL:.0%} t-interval": seeds.interval_text(), "speed-up by seed": seeds.summary(),
                        "separable from 1": seeds.separable()})
    return pd.DataFrame(out)


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


def _seed_curves(rows: pd.DataFrame, method: str, final: bool = False) -> dict:
    """seed -> (steps, FIDs) of a method's runs, or seed -> its final FID."""
    curves = {seed: (list(c.step), list(c.FID)) for seed, c in rows[rows.method == method].sort_values("step").groupby("seed")}
    return {seed: fids[-1] for seed, (_, fids) in curves.items()} if final else curves


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


def students_by_teacher(cfg) -> dict[str, list[dict]]:
    """teacher run -> its students (distill runs, one per consistency method), each with its method's title."""
    by_teacher = {}
    for d in cfg["distill_runs"]:
        by_teacher.setdefault(d["teacher"], []).append({**d, "title": consistency_method(d["method"]).title})
    return by_teacher


def scm_table(df, cfg) -> pd.DataFrame:
    """For each teacher: its samplers, then each student's (one per consistency method) 1- and 2-step FID at each
    distill checkpoint, as ratios to the teacher's reference sampler and to its ODE ceiling."""
    pipe, rows = cfg["pipeline"], []
    for teacher_run, students in students_by_teacher(cfg).items():
        teacher = df[(df.run == teacher_run) & (df.step == pipe["train_steps"])].set_index("sampler")
        ref, ode = teacher.loc[pipe["teacher_sampler"]], teacher.loc[pipe["teacher_ode_sampler"]]
        rows += [{"teacher": teacher_run, "model": "teacher", "sampler": s, "step": pipe["train_steps"], **_scm_row(teacher.loc[s], ref, ode)}
                 for s in cfg["teacher_samplers"]]
        warm = pipe["distill_warm_start"]
        for d in students:
            for _, r in df[df.run == d["name"]].sort_values(["step", "sampler"]).iterrows():
                stage = "warm start only" if r.step == warm else f"{d['title']} {r.step - warm} steps"
                rows.append({"teacher": teacher_run, "model": f"{d['title']} student ({stage})", "sampler": r.sampler, "step": r.step,
                             **_scm_row(r, ref, ode)})
    return pd.DataFrame(rows)


def _scm_row(r, ref, ode) -> dict:
    return {"NFE": int(r.nfe), "FID": round(r.FID, 3), "label acc.": round(r["label acc."], 3),  # NaN when unconditional
            "FID / teacher": round(r.FID / ref.FID, 3), "FID / ODE": round(r.FID / ode.FID, 3),
            "s/image": round(r.seconds_per_image, 5), "sampling speed-up": round(ref.seconds_per_image / r.seconds_per_image, 1)}


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


@STAGES["report"].entry
def run(cfg, provenance):
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    pipe, layout = cfg["pipeline"], Layout(Path(cfg["root"]))
    df = load_metrics(cfg["evaluations"])
    curve = df[(df.kind == "train") & (df.sampler == pipe["curve_sampler"]) & df.step.isin(pipe["eval_steps"])]
    methods = list(cfg["methods"])
    setting = (f"sampler {pipe['curve_sampler']}, {pipe['curve_samples']} samples vs the {pipe['extractor']} reference of "
               f"the full dataset; mean ± std over seeds {pipe['seeds']}")

    # --- every metric of every run, then the named tables
    write_table(layout, "metrics", f"All metrics per run, {setting.split(';')[0]}.",
                ("", "", curve.drop(columns=["kind", "grid"]).sort_values(["method", "step", "seed"])))
    tables = {}
    for table in cfg["tables"]:
        metrics, speedup, differences = named_table(curve, table)
        reference = f" Speed-up against `{table['reference']}`." if table["reference"] else ""
        parts = [("", "", metrics), ("_speedup", "Speed-up and final values", speedup)]
        if len(differences):
            parts.append(("_differences", f"FID minus the reference's, paired by seed ({LEVEL:.0%} t-interval of the mean)", differences))
        budgets = None
        if table.get("budgets"):
            budgets = budget_table(curve, table)
            parts.append(("_budgets", "Speed-up against the training budget B: the iterations to reach the reference's FID "
                                      f"at B, seed by seed ({LEVEL:.0%} t-interval of the mean)", budgets))
            save_figure(budget_figure(budgets, table["reference"]), layout, f"{table['name']}_budgets")
        write_table(layout, table["name"], f"Table `{table['name']}`. {table['caption']} {setting}.{reference}".replace("  ", " "), *parts)
        save_figure(fid_figure(curve, table["methods"], table["reference"], pipe, speedup, log_steps=bool(table.get("budgets"))),
                    layout, table["name"])
        tables[table["name"]] = (speedup, budgets)

    # --- training and method figures
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    logs = pd.concat([pd.read_csv(r["log"]).assign(method=r["method"]) for r in cfg["train_runs"]])
    for m in methods:
        mean = logs[logs.method == m].groupby("step").mean(numeric_only=True)
        axes[0].plot(mean.index, mean["loss"], label=m)
        axes[1].plot(mean.index, mean["mse"], label=m)
    axes[0].set(xlabel="iteration", ylabel="weighted loss", yscale="log")
    axes[1].set(xlabel="iteration", ylabel="MSE term (unweighted)", yscale="log")
    axes[0].legend(fontsize=7, ncol=2 if len(methods) > 6 else 1)
    save_figure(fig, layout, "training_loss")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m, dcfg in cfg["diffusion"].items():
        diffusion = create_diffusion(noise_schedule=dcfg["noise_schedule"], diffusion_steps=dcfg["diffusion_steps"])
        sampler = build_sampler(dcfg["timestep_sampler"]["name"], diffusion, **named_params(dcfg["timestep_sampler"]))
        weights = build_weighting(dcfg["loss_weighting"]["name"], diffusion, **named_params(dcfg["loss_weighting"]))
        axes[0].plot(sampler.distribution(cfg["train"]["global_batch_size"], step=pipe["train_steps"]).numpy(), label=m)  # CLTS: at the end
        axes[1].plot(weights.numpy(), label=m)
    axes[0].set(xlabel="timestep t", ylabel="sampling probability", title="timestep sampling")
    axes[1].set(xlabel="timestep t", ylabel="MSE weight w_t", title="loss weighting")
    axes[0].legend(fontsize=7, ncol=2 if len(methods) > 6 else 1)
    save_figure(fig, layout, "timestep_methods")

    first_seed, classes = pipe["seeds"][0], cfg["train"]["num_classes"]
    runs = {r["method"]: r["name"] for r in cfg["train_runs"] if r["seed"] == first_seed}
    grid_panels(df, layout, "samples_per_method",
                [[(runs[m], s, pipe["curve_sampler"], f"{m}, {s} it,") for s in pipe["eval_steps"]] for m in methods], classes)

    # --- consistency models versus their teachers
    scm = None
    if cfg["distill_runs"]:
        scm = scm_table(df, cfg)
        write_table(layout, "scm", f"Consistency models versus their teacher ({pipe['extractor']} features, {pipe['final_samples']} "
                    f"samples each, same reference): FID / teacher against the teacher's {pipe['teacher_sampler']}, FID / ODE "
                    f"against its probability-flow ODE ({pipe['teacher_ode_sampler']}), the ceiling of a converged consistency "
                    f"model.", ("", "", scm))
        final, last = pipe["train_steps"], max(pipe["distill_eval_steps"])
        by_teacher = students_by_teacher(cfg)
        grid_panels(df, layout, "teacher_grid", [[(t, final, s, f"teacher {t}") for s in (pipe["teacher_sampler"], pipe["curve_sampler"])]
                                                 for t in by_teacher], classes)
        grid_panels(df, layout, "teacher_vs_scm", [
            [(t, final, s, "teacher") for s in (pipe["teacher_sampler"], pipe["teacher_ode_sampler"],
                                                 *[b for b in pipe["teacher_baselines"] if parse_sampler(b).name == "ddim2"])]
            + [(d["name"], last, s, f"{d['title']} student") for d in students for s in pipe["scm_samplers"]]
            for t, students in by_teacher.items()], classes)

        fig, axes = plt.subplots(1, len(by_teacher), figsize=(5.5 * len(by_teacher), 3.5), squeeze=False)
        for ax, (t, students) in zip(axes[0], by_teacher.items()):
            for d in students:
                for sampler in pipe["scm_samplers"]:
                    s = df[(df.run == d["name"]) & (df.sampler == sampler)].sort_values("step")
                    ax.plot(s.step - pipe["distill_warm_start"], s.FID, marker="o", label=f"{d['title']} {sampler}")
            teacher = df[(df.run == t) & (df.step == final)].set_index("sampler")
            for k, sampler in enumerate(cfg["teacher_samplers"]):
                ax.axhline(teacher.loc[sampler].FID, ls="--", lw=1, color=f"C{k + 2 * len(students)}", label=f"teacher {sampler}")
            ax.set(xlabel="consistency steps after the warm start", ylabel=f"FID ({pipe['final_samples']} samples)", yscale="log",
                   title=f"consistency models of {t}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, layout, "distillation")

    atomic_write_text(layout.table("summary", "json"), json.dumps(summary(cfg, curve, df), indent=2, allow_nan=False))
    usage = usage_tables(cfg["usage"])
    write_table(layout, "usage", "Where the time went: each job's wall time, CPU time (its process and the processes it "
                "started) and peak memory where it ran, then per stage.", *usage)
    atomic_write_text(layout.readme(), experiment_readme(cfg, tables, scm, df, usage))
    return layout.root


def summary(cfg, curve: pd.DataFrame, df: pd.DataFrame) -> dict:
    """The run's claims as numbers, seed by seed (what `speedpipe check` compares with a reference output): each named
    table's per-seed FID curves and speed-ups, each teacher's samplers and its students' checkpoints."""
    pipe = cfg["pipeline"]
    out = {"experiment": pipe["experiment"], "seeds": pipe["seeds"], "steps": pipe["eval_steps"], "tables": {}, "teachers": {}}
    for table in cfg["tables"]:
        rows = curve[curve.method.isin(table["methods"])]
        fids = {m: {str(seed): list(c.sort_values("step").FID) for seed, c in rows[rows.method == m].groupby("seed")}
                for m in table["methods"]}
        accuracy = {m: rows[(rows.method == m) & (rows.step == rows.step.max())]["label acc."].mean() for m in table["methods"]}
        entry = {"reference": table["reference"], "fid": fids,
                 "label_accuracy": {m: None if pd.isna(a) else float(a) for m, a in accuracy.items()}}
        if table["reference"]:
            target = float(np.mean([v[-1] for v in fids[table["reference"]].values()]))
            mean_curve = {m: list(rows[rows.method == m].groupby("step").FID.mean()) for m in table["methods"]}
            entry["target"] = target
            entry["speedup"] = {}
            for m in table["methods"]:
                reached, how = crossing(pipe["eval_steps"], mean_curve[m], target)
                seeds = seed_speedups(_seed_curves(rows, m), _seed_curves(rows, table["reference"], final=True), pipe["eval_steps"][-1])
                entry["speedup"][m] = {"mean_curve": None if reached is None else pipe["eval_steps"][-1] / reached, "how": how,
                                       "per_seed": list(seeds.values), "per_seed_how": list(seeds.how),
                                       "interval": list(seeds.interval) if seeds.interval else None}
        out["tables"][table["name"]] = entry
    number = lambda r: {"fid": float(r.FID), "label_accuracy": None if pd.isna(r["label acc."]) else float(r["label acc."])}  # noqa: E731
    for t, students in students_by_teacher(cfg).items():
        teacher = df[(df.run == t) & (df.step == pipe["train_steps"])]
        out["teachers"][t] = {
            "reference_sampler": pipe["teacher_sampler"], "ode_sampler": pipe["teacher_ode_sampler"],
            "samplers": {r.sampler: number(r) for _, r in teacher.iterrows()},
            "students": {d["method"]: {str(int(step)): {r.sampler: number(r) for _, r in g.iterrows()}
                                       for step, g in df[df.run == d["name"]].groupby("step")} for d in students}}
    return out


def usage_tables(records) -> tuple[tuple[str, str, pd.DataFrame], tuple[str, str, pd.DataFrame]]:
    """(per job, per stage) tables of the jobs' resource records (speedpipe.launch.run_recording_usage)."""
    jobs = []
    for r in records:
        u = json.loads(Path(r["path"]).read_text())
        jobs.append({"rule": r["rule"], "job": r["job"], "stage": "+".join(dict.fromkeys(u["stages"])), "host": u["host"],
                     "wall s": u["wall_s"], "CPU s": u["cpu_s"], "peak RSS MB": u["peak_rss_mb"]})
    jobs = pd.DataFrame(jobs)
    stages = jobs.groupby("stage", sort=False).agg(jobs=("rule", "size"), **{"wall s": ("wall s", "sum"), "CPU s": ("CPU s", "sum"),
                                                                             "max peak RSS MB": ("peak RSS MB", "max")}).reset_index()
    stages.loc[len(stages)] = {"stage": "all", "jobs": len(jobs), "wall s": jobs["wall s"].sum(), "CPU s": jobs["CPU s"].sum(),
                               "max peak RSS MB": jobs["peak RSS MB"].max()}
    return ("", "Per job", jobs.round(1)), ("_per_stage", "Per stage (wall s summed over the stage's jobs)", stages.round(1))


def method_lines(cfg) -> str:
    """One line per consistency method of the experiment: what its student follows (the method's section)."""
    methods = [consistency_method(m) for m in dict.fromkeys(d["method"] for d in cfg["distill_runs"])]
    guidance = cfg["distill"]["cfg_scale"]
    return "\n".join(f"- {m.title} (`{m.name}`): the student follows {m.follows}"
                      + (f"; its objective evaluates the teacher, at guidance {guidance}." if m.teacher_velocity else
                         "; its objective evaluates no teacher.") for m in methods)


def kept_runs(cfg) -> str:
    """A section listing the runs of other settings kept in the run folders' stores (docs/faults.md), if any."""
    root = Path(cfg["root"])
    folders = [Path(r["log"]).parent for r in cfg["train_runs"]] + [root / "distill" / r["name"] for r in cfg["distill_runs"]]
    lines = []
    for folder in folders:
        current = runstore.current_state(folder)
        for state, differ in runstore.superseded(folder, runstore.recorded_settings(current) if current else {}):
            lines.append(f"- `{state.relative_to(root)}`: {', '.join(differ) or 'the same settings'}")
    if not lines:
        return ""
    return ("\n## Runs of other settings, kept\n\nThe run folders' stores keep these runs of earlier settings (the keys in "
            "which they differ from the run reported above); `python -m speedpipe.runstore prune "
            f"{root} --yes` removes them.\n\n" + "\n".join(lines) + "\n")


def budget_section(name: str, budgets: pd.DataFrame) -> str:
    shown = budgets[["method", "budget", "reference FID at budget", "iterations to reach it", "speed-up",
                     f"speed-up {LEVEL:.0%} t-interval", "speed-up by seed"]]
    return f"""
#### Speed-up against the training budget

For each evaluated iteration B taken as the budget: the iterations each method needs to reach the reference's FID at
B (mean curves; then seed by seed against the same seed's reference, with the t-interval of the mean).

![speed-up against the budget, table {name}](figures/{name}_budgets.png)

{as_markdown(without_empty_columns(shown))}
"""


def experiment_readme(cfg, tables: dict, scm, df, usage) -> str:
    import diffusers
    import snakemake
    import torch_fidelity

    pipe, d = cfg["pipeline"], cfg["distill"]
    methods = "; ".join(f"`{m}` ({Path(c['config']).name}{' + ' + ', '.join(c['overrides']) if c['overrides'] else ''})"
                        for m, c in cfg["methods"].items())
    sections = "\n".join(f"""### Table `{name}`

![FID against iterations, table {name}](figures/{name}.png)

{as_markdown(without_empty_columns(speedup))}

FID and the other metrics at the table's iterations: `tables/{name}.md` (also `.csv`, `.tex`).
{"" if budgets is None else budget_section(name, budgets)}""" for name, (speedup, budgets) in tables.items())
    warm_start = None if d is None else ("a regression on the teacher's velocity at guidance " + str(d["cfg_scale"])
                                         if d["warm_start_target"] == "teacher" else "the TrigFlow diffusion loss on the data")
    scm_section = "" if scm is None else f"""
## The teachers

![teacher samples, one row per class](figures/teacher_grid.png)

## Consistency models versus teacher

Teachers {list(students_by_teacher(cfg))} at {pipe['train_steps']} iterations; from each, every consistency method starts
from the teacher's weights with the same {pipe['distill_warm_start']}-step TrigFlow warm start ({warm_start}), then takes
{pipe['distill_steps']} steps of its own objective (σ_d = {d['sigma_d']},
P_mean = {d['p_mean']}, P_std = {d['p_std']}, lr {d['lr']}); {pipe['final_samples']} samples per evaluation. The methods:
{method_lines(cfg)}

![distillation curve](figures/distillation.png)

![teacher and consistency-model samples, one row per class](figures/teacher_vs_scm.png)

{as_markdown(without_empty_columns(scm))}
"""
    return f"""# Experiment `{pipe['experiment']}`

Generated by `speedpipe report`. Everything below was measured by this pipeline run.

- Methods: {methods}; seeds {pipe['seeds']}; {pipe['train_steps']} training iterations.
- Evaluation: {pipe['extractor']} features via torch-fidelity; reference `{df.reference.iloc[0]}` (real images of the dataset);
  FID curves with `{pipe['curve_sampler']}` on {pipe['curve_samples']} samples per point.
  Label accuracy: the fraction of samples the dataset's classifier assigns to the label they were generated for.
- Software: Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__},
  torch-fidelity {torch_fidelity.__version__}, snakemake {snakemake.__version__}; machine {platform.machine()}, {torch.get_num_threads()} threads.

## Tables

Each table: the speed-up against its reference method (the reference's final FID, its mean over the reference's seeds,
is the target; iterations to reach it by linear interpolation of the mean FID curve, then seed by seed with the mean,
standard deviation and two-sided {LEVEL:.0%} Student-t interval over seeds; a seed that reaches the target only before the
first evaluation, or never, gives a bound and no interval; "separable" when the interval excludes 1.0) and the final
values, mean ± std over seeds; then each method's FID minus the reference's at the table's iterations, paired by seed,
with its t-interval ("resolved" when it excludes 0).

{sections}
Every metric of every run: `tables/metrics.md`. Figures: `figures/training_loss.png`, `figures/timestep_methods.png`,
`figures/samples_per_method.png`.
{scm_section}{kept_runs(cfg)}
## Where the time went

{as_markdown(usage[1][2])}

Per job: `tables/usage.md` (each job's own record, written where it ran; the sum of wall times exceeds the run's wall
time where jobs ran side by side).

## Experiment file

Its launcher settings and the overrides of settings that change no result (progress bars, resume cadence) are left out.

```yaml
{json.dumps(pipe, indent=2)}
```
"""
