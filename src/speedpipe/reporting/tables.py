"""The report's tables: the metrics files as one frame, the named tables with their speed-ups and paired differences,
the speed-up against the budget, the consistency models against their teachers, the jobs' resource use; written as
CSV, Markdown and LaTeX."""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from speedpipe.consistency.methods import consistency_method
from speedpipe.io import atomic_path, atomic_write_text
from speedpipe.layout import Layout
from speedpipe.uncertainty import LEVEL, budget_speedups, crossing, paired_difference, seed_speedups, t_interval

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
            seeds = seed_speedups(seed_curves(rows, m), seed_curves(rows, reference, final=True), last)
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
        by_seed = budget_speedups(seed_curves(rows, m), seed_curves(rows, reference), budgets)
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
        ref = ode = None  # a student without a teacher (teacher "none") has no teacher to be compared with
        if teacher_run is not None:
            teacher = df[(df.run == teacher_run) & (df.step == pipe["train_steps"])].set_index("sampler")
            ref, ode = teacher.loc[pipe["teacher_sampler"]], teacher.loc[pipe["teacher_ode_sampler"]]
            rows += [{"teacher": teacher_run, "model": "teacher", "sampler": s, "step": pipe["train_steps"],
                      **_scm_row(teacher.loc[s], ref, ode)} for s in cfg["teacher_samplers"]]
        warm = pipe["distill_warm_start"]
        for d in students:
            for _, r in df[df.run == d["name"]].sort_values(["step", "sampler"]).iterrows():
                stage = "warm start only" if r.step == warm else f"{d['title']} {r.step - warm} steps"
                rows.append({"teacher": teacher_run or "none", "model": f"{d['title']} student ({stage})", "sampler": r.sampler,
                             "step": r.step, **_scm_row(r, ref, ode)})
    return pd.DataFrame(rows)


def scm_across_teachers(df, cfg) -> pd.DataFrame:
    """Each teacher sampler, and each method's students at each evaluated step and sampler, over the teachers: the mean
    FID with its t-interval (the teachers are the seeds of the comparison), each teacher's FID, the mean label accuracy.
    Students without a teacher are not in it."""
    pipe, rows = cfg["pipeline"], []
    teachers = {t: students for t, students in students_by_teacher(cfg).items() if t is not None}
    final = df[df.run.isin(list(teachers)) & (df.step == pipe["train_steps"])]
    groups = [("teacher", s, final[final.sampler == s]) for s in cfg["teacher_samplers"]]
    warm = pipe["distill_warm_start"]
    for title, method in dict.fromkeys((d["title"], d["method"]) for students in teachers.values() for d in students):
        runs = df[df.run.isin([d["name"] for students in teachers.values() for d in students if d["method"] == method])]
        for (step, sampler), g in runs.groupby(["step", "sampler"]):
            stage = "warm start only" if step == warm else f"{title} {step - warm} steps"
            groups.append((f"{title} student ({stage})", sampler, g))
    for model, sampler, g in groups:
        fids = [float(v) for v in g.FID]
        interval = t_interval(fids)
        rows.append({"model": model, "sampler": sampler, "NFE": int(g.nfe.iloc[0]), "teachers": len(fids),
                     "FID": round(sum(fids) / len(fids), 3),
                     f"FID {LEVEL:.0%} t-interval": "n = 1, no interval" if interval is None else
                     f"{interval[0]:.2f} – {interval[1]:.2f}", "FID by teacher": " / ".join(f"{v:.2f}" for v in fids),
                     "label acc.": round(float(g["label acc."].mean()), 3)})
    return pd.DataFrame(rows)


def _scm_row(r, ref, ode) -> dict:
    """A row's numbers; its ratios to the teacher's samplers are NaN without a teacher (ref and ode None)."""
    nan = float("nan")
    return {"NFE": int(r.nfe), "FID": round(r.FID, 3), "label acc.": round(r["label acc."], 3),  # NaN when unconditional
            "FID / teacher": nan if ref is None else round(r.FID / ref.FID, 3),
            "FID / ODE": nan if ode is None else round(r.FID / ode.FID, 3), "s/image": round(r.seconds_per_image, 5),
            "sampling speed-up": nan if ref is None else round(ref.seconds_per_image / r.seconds_per_image, 1)}


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


def seed_curves(rows: pd.DataFrame, method: str, final: bool = False) -> dict:
    """seed -> (steps, FIDs) of a method's runs, or seed -> its final FID."""
    curves = {seed: (list(c.step), list(c.FID)) for seed, c in rows[rows.method == method].sort_values("step").groupby("seed")}
    return {seed: fids[-1] for seed, (_, fids) in curves.items()} if final else curves
