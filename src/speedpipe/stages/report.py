"""Stage `report`: the papers' tables and figures from the metrics files and training logs.

Tables (CSV, Markdown, LaTeX): for each named table of the experiment file, FID, label accuracy, KID, IS,
precision and recall of its methods at its iterations (mean ± std over seeds) and each method's iteration
speed-up at the reference method's final FID; every metric of every run; the consistency models (one per method,
speedpipe.consistency.methods) versus each teacher (its reference sampler and its ODE ceiling) over their checkpoints. Figures (PNG and PDF): FID curves with seed
bands per named table, training losses, timestep distributions and weights per method, sample grids with one
row per class, the distillation curves. A generated README.md says what was run.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from speedpipe.io import atomic_write_text
from speedpipe.layout import Layout
from speedpipe.reporting.figures import (budget_figure, distillation_figure, fid_figure, grid_panels, save_figure,
                                         timestep_methods_figure, training_loss_figure)
from speedpipe.reporting.readme import experiment_readme
from speedpipe.reporting.tables import (budget_table, load_metrics, named_table, scm_across_teachers, scm_table, seed_curves,
                                        students_by_teacher, usage_tables, write_table)
from speedpipe.sampler_labels import parse_sampler
from speedpipe.stages import STAGES
from speedpipe.uncertainty import LEVEL, crossing, seed_speedups


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
    save_figure(training_loss_figure(cfg["train_runs"], methods), layout, "training_loss")
    save_figure(timestep_methods_figure(cfg, methods), layout, "timestep_methods")

    first_seed, classes = pipe["seeds"][0], cfg["train"]["num_classes"]
    runs = {r["method"]: r["name"] for r in cfg["train_runs"] if r["seed"] == first_seed}
    grid_panels(df, layout, "samples_per_method",
                [[(runs[m], s, pipe["curve_sampler"], f"{m}, {s} it,") for s in pipe["eval_steps"]] for m in methods], classes)

    # --- consistency models versus their teachers
    scm = None
    if cfg["distill_runs"]:
        scm = scm_table(df, cfg)
        write_table(layout, "scm", f"Consistency models versus their teacher ({pipe['extractor']} features, {pipe['final_samples']} "
                    f"samples each, same reference)" + (f": FID / teacher against the teacher's {pipe['teacher_sampler']}, FID / "
                    f"ODE against its probability-flow ODE ({pipe['teacher_ode_sampler']}), the ceiling of a converged "
                    f"consistency model" if "teacher_sampler" in pipe else "") + (
                    "; students without a teacher under teacher none" if pipe["teacher_free"] else "") + ".", ("", "", scm))
        if sum(t is not None for t in students_by_teacher(cfg)) > 1:
            write_table(layout, "scm_across_teachers", f"The consistency models over their {pipe['extractor']}-feature FID "
                        f"({pipe['final_samples']} samples each), mean over the teachers with its {LEVEL:.0%} t-interval "
                        f"(the teachers are the seeds of the comparison).", ("", "", scm_across_teachers(df, cfg)))
        final, last = pipe["train_steps"], max(pipe["distill_eval_steps"])
        by_teacher = students_by_teacher(cfg)
        teachers = [t for t in by_teacher if t is not None]
        if teachers:
            grid_panels(df, layout, "teacher_grid", [[(t, final, s, f"teacher {t}") for s in (pipe["teacher_sampler"], pipe["curve_sampler"])]
                                                     for t in teachers], classes)
        grid_panels(df, layout, "teacher_vs_scm", [
            ([] if t is None else [(t, final, s, "teacher") for s in (
                pipe["teacher_sampler"], pipe["teacher_ode_sampler"],
                *[b for b in pipe["teacher_baselines"] if parse_sampler(b).name == "ddim2"])])
            + [(d["name"], last, s, f"{d['title']} student" + (" (no teacher)" if t is None else ""))
               for d in students for s in pipe["scm_samplers"]]
            for t, students in by_teacher.items()], classes)

        save_figure(distillation_figure(df, cfg, by_teacher), layout, "distillation")

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
                seeds = seed_speedups(seed_curves(rows, m), seed_curves(rows, table["reference"], final=True), pipe["eval_steps"][-1])
                entry["speedup"][m] = {"mean_curve": None if reached is None else pipe["eval_steps"][-1] / reached, "how": how,
                                       "per_seed": list(seeds.values), "per_seed_how": list(seeds.how),
                                       "interval": list(seeds.interval) if seeds.interval else None}
        out["tables"][table["name"]] = entry
    number = lambda r: {"fid": float(r.FID), "label_accuracy": None if pd.isna(r["label acc."]) else float(r["label acc."])}  # noqa: E731
    for t, students in students_by_teacher(cfg).items():
        teacher = {} if t is None else {  # students without a teacher ("none"): their numbers only
            "reference_sampler": pipe["teacher_sampler"], "ode_sampler": pipe["teacher_ode_sampler"],
            "samplers": {r.sampler: number(r) for _, r in df[(df.run == t) & (df.step == pipe["train_steps"])].iterrows()}}
        out["teachers"][t or "none"] = {**teacher, "students": {
            d["method"]: {str(int(step)): {r.sampler: number(r) for _, r in g.iterrows()}
                          for step, g in df[df.run == d["name"]].groupby("step")} for d in students}}
    return out


