"""The report's named tables against hand computations: mean ± std over seeds, the speed-up at the reference's final
FID (interpolated, reached before the first evaluation, never reached), the table's iterations, the files."""
import numpy as np
import pandas as pd
import pytest

from speedpipe.layout import Layout
from speedpipe.reporting.tables import CURVE_METRICS, named_table, write_table

# FID per seed at iterations 100, 200, 300; the means are in the comments
FIDS = {
    "base": {0: [30, 20, 10], 1: [34, 22, 12]},    # 32, 21, 11: the reference's final FID is 11
    "fast_k": {0: [28, 12, 8], 1: [30, 14, 6]},    # 29, 13, 7: reaches 11 at 200 + (13 - 11) / (13 - 7) * 100
    "slow": {0: [40, 30, 20], 1: [40, 30, 20]},    # never
    "early": {0: [10, 9, 8], 1: [10, 9, 8]},       # already at the first evaluation
}


@pytest.fixture
def curve():
    rows = [{"method": m, "seed": seed, "step": step, "FID": float(fid), **{k: 0.5 for k in CURVE_METRICS if k != "FID"}}
            for m, seeds in FIDS.items() for seed, fids in seeds.items() for step, fid in zip((100, 200, 300), fids)]
    return pd.DataFrame(rows)


def test_named_table_against_a_hand_computation(curve):
    table = {"name": "t", "methods": ["base", "fast_k", "slow", "early"], "reference": "base", "steps": [200, 300], "caption": ""}
    metrics, speedup, _ = named_table(curve, table)
    assert list(zip(metrics.method, metrics.step)) == [(m, s) for m in table["methods"] for s in (200, 300)]
    assert metrics.set_index(["method", "step"]).loc[("base", 300), "FID"] == "11.00 ± 1.00"
    assert metrics.set_index(["method", "step"]).loc[("fast_k", 200), "FID"] == "13.00 ± 1.00"
    s = speedup.set_index("method")
    assert (s["reference final FID"] == 11.0).all()
    assert s.loc["base", "speed-up"] == 1.0 and s.loc["base", "reached"] == "reference"
    assert s.loc["fast_k", "iterations to reach it"] == 233 and s.loc["fast_k", "speed-up"] == round(300 / (200 + 100 / 3), 2)
    assert s.loc["fast_k", "reached"] == "interpolated" and s.loc["fast_k", "final FID"] == "7.00 ± 1.00"
    assert s.loc["early", "iterations to reach it"] == 100 and s.loc["early", "speed-up"] == 3.0
    assert s.loc["early", "reached"] == "at or before the first evaluation"
    assert s.loc["slow", "reached"] == "not reached" and pd.isna(s.loc["slow", "speed-up"])


def test_a_table_without_a_reference_has_no_speed_up(curve):
    _, speedup, differences = named_table(curve, {"name": "t", "methods": ["slow", "base"], "reference": None, "steps": [300], "caption": ""})
    assert differences.empty
    assert list(speedup.columns) == ["method", "final FID", "final label acc."] and list(speedup.method) == ["slow", "base"]


def test_table_files_hold_every_part(tmp_path, curve):
    metrics, speedup, _ = named_table(curve, {"name": "t", "methods": ["base", "fast_k"], "reference": "base", "steps": [300], "caption": ""})
    write_table(Layout(tmp_path), "t", "Caption.", ("", "", metrics), ("_speedup", "Speed-up", speedup))
    assert pd.read_csv(tmp_path / "tables/t.csv").shape == (2, 2 + len(CURVE_METRICS))
    assert np.allclose(pd.read_csv(tmp_path / "tables/t_speedup.csv")["speed-up"], [1.0, 1.29])
    markdown = (tmp_path / "tables/t.md").read_text()
    assert markdown.startswith("Caption.") and "**Speed-up**" in markdown and "fast_k" in markdown
    latex = (tmp_path / "tables/t.tex").read_text()
    assert latex.count("\\begin{tabular}") == 2 and "fast\\_k" in latex  # underscores escaped: the file compiles


def test_speed_ups_seed_by_seed_with_their_interval_against_a_hand_computation(curve):
    """Each seed's crossing of the reference's final FID in the same seed (10 and 12): fast_k's seeds at 250 and 225
    (speed-ups 1.2 and 4/3), a 95 % t-interval with 1 degree of freedom (t = 12.706) that includes 1; both of slow's
    seeds never reach theirs (bounds, no interval); early's seeds reach theirs at the first evaluation."""
    from scipy.stats import t

    table = {"name": "t", "methods": ["base", "fast_k", "slow", "early"], "reference": "base", "steps": [300], "caption": ""}
    _, speedup, differences = named_table(curve, table)
    s = speedup.set_index("method")
    a, b = 300 / 250, 300 / 225
    mean, sd = (a + b) / 2, abs(a - b) / 2 ** 0.5
    half = t.ppf(0.975, 1) * sd / 2 ** 0.5
    assert s.loc["fast_k", "speed-up 95% t-interval"] == f"{mean - half:.2f}-{mean + half:.2f}"
    assert s.loc["fast_k", "speed-up by seed"] == f"per seed {a:.2f}, {b:.2f}; mean {mean:.2f} ± {sd:.2f}, 95% t-interval {mean - half:.2f}-{mean + half:.2f}"
    assert s.loc["fast_k", "separable from the reference"] == "no: the interval includes 1.0"
    assert s.loc["base", "speed-up by seed"] == "per seed 1.00, 1.00; mean 1.00 ± 0.00, 95% t-interval 1.00-1.00"
    assert s.loc["slow", "speed-up by seed"].startswith("per seed < 1 (not reached), < 1 (not reached): no interval")
    assert s.loc["slow", "separable from the reference"] == "unknown (bounds only)"
    assert s.loc["early", "speed-up by seed"].startswith("per seed ≥ 3.00, ≥ 3.00")
    assert s.loc["early", "separable from the reference"] == "yes (every seed faster than a bound above 1)"
    d = differences.set_index("method")
    assert d.loc["fast_k", "FID - reference"] == -4.0  # seeds: 8 - 10 and 6 - 12
    half = t.ppf(0.975, 1) * (8 ** 0.5) / 2 ** 0.5
    assert d.loc["fast_k", "95% t-interval"] == f"{-4 - half:.2f} to {-4 + half:.2f}" and d.loc["fast_k", "resolved"] == "no"
    assert d.loc["early", "FID - reference"] == -3.0 and d.loc["early", "resolved"] == "no"  # 8 - 10, 8 - 12


def test_a_one_seed_table_says_it_has_no_interval(curve):
    one = curve[curve.seed == 0]
    _, speedup, differences = named_table(one, {"name": "t", "methods": ["base", "fast_k"], "reference": "base", "steps": [300],
                                                "caption": ""})
    s = speedup.set_index("method")
    assert s.loc["fast_k", "speed-up by seed"] == "1.20 (n = 1, no interval)"  # reaches 10 (seed 0) at 250
    assert s.loc["fast_k", "separable from the reference"] == s.loc["fast_k", "speed-up 95% t-interval"] == "n = 1, no interval"
    assert list(differences["resolved"]) == ["n = 1, no interval"]


def test_t_interval_of_three_values():
    from speedpipe.uncertainty import t_interval

    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert low == pytest.approx(2 - 4.302653 / 3 ** 0.5, abs=1e-5) and high == pytest.approx(2 + 4.302653 / 3 ** 0.5, abs=1e-5)


def test_the_speed_up_at_every_budget_against_a_hand_computation(curve):
    """Budget B = each evaluated iteration: the iterations a method needs to reach the reference's FID at B. fast_k
    against base at B = 200 (base's mean FID 21; fast_k's mean curve 29, 13, 7 reaches it at 100 + 8/16 * 100 = 150:
    1.33x); seed by seed, base's FIDs at 200 are 20 and 22, fast_k's seeds (28, 12, 8) and (30, 14, 6) reach them at
    100 + 8/16*100 = 150 and 100 + 8/16*100 = 150 (both 1.33x: no spread). At B = 300 as the final-FID speed-up above."""
    from scipy.stats import t

    from speedpipe.reporting.tables import budget_table

    table = {"name": "t", "methods": ["base", "fast_k", "slow"], "reference": "base", "steps": [300], "caption": "", "budgets": True}
    b = budget_table(curve, table).set_index(["method", "budget"])
    assert list(b.loc["fast_k"].index) == [100, 200, 300] and "base" not in b.index.get_level_values(0)
    row = b.loc[("fast_k", 200)]
    assert row["reference FID at budget"] == 21.0 and row["iterations to reach it"] == 150 and row["speed-up"] == round(200 / 150, 2)
    assert row["speed-up by seed"] == "per seed 1.33, 1.33; mean 1.33 ± 0.00, 95% t-interval 1.33-1.33"
    assert row["separable from 1"] == "yes"
    first = b.loc[("fast_k", 100)]  # base at 100: 30 and 34; fast_k's first FIDs 28 and 30 are already below
    assert first["reached"] == "at or before the first evaluation" and first["speed-up"] == 1.0
    assert first["speed-up 95% t-interval"] == "bounds only"
    last = b.loc[("fast_k", 300)]  # the same numbers as the final-FID speed-up: seeds at 250 and 225
    x, y = 300 / 250, 300 / 225
    mean, sd = (x + y) / 2, abs(x - y) / 2 ** 0.5
    half = t.ppf(0.975, 1) * sd / 2 ** 0.5
    assert last["speed-up 95% t-interval"] == f"{mean - half:.2f}-{mean + half:.2f}" and last["speed-up mean over seeds"] == round(mean, 2)
    slower = b.loc[("slow", 200)]  # slow's 40, 30, 20 reaches 21 at 200 + 9/10 * 100 = 290, after the budget: below 1
    assert slower["iterations to reach it"] == 290 and slower["speed-up"] == round(200 / 290, 2)
    assert b.loc[("slow", 300), "reached"] == "not reached" and pd.isna(b.loc[("slow", 300), "speed-up"])


def test_the_budget_figure_draws_the_interval_where_every_seed_crossed(curve, tmp_path):
    from speedpipe.reporting.figures import budget_figure
    from speedpipe.reporting.tables import budget_table

    budgets = budget_table(curve, {"name": "t", "methods": ["base", "fast_k"], "reference": "base", "steps": [300], "caption": ""})
    ax = budget_figure(budgets, "base").axes[0]
    assert ax.get_xscale() == "log"
    bars = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    assert len(bars) == 1 and list(bars[0][0].get_xdata()) == [200, 300]  # B = 100 is a bound: no interval drawn


def test_the_students_over_their_teachers_against_a_hand_computation():
    """scm_across_teachers: per teacher sampler and per method, step and sampler, the mean FID over the teachers with the
    95 % t-interval (t(0.975, 2) = 4.3027: mean 6, sd 1 over three -> 6 ± 2.484), each teacher's value; a student
    without a teacher is left out."""
    from speedpipe.reporting.tables import scm_across_teachers

    def row(run, step, sampler, fid, acc=0.5, nfe=1):
        return {"run": run, "step": step, "sampler": sampler, "FID": fid, "label acc.": acc, "nfe": nfe}

    rows = [row(f"speed-s{i}", 800, "ddpm250", fid, nfe=250) for i, fid in enumerate((4.0, 4.5, 5.0))]
    rows += [row(f"meanflow-speed-s{i}", 400, "scm1", fid, acc) for i, (fid, acc) in enumerate(((5.0, 0.3), (6.0, 0.4), (7.0, 0.5)))]
    rows += [row(f"meanflow-speed-s{i}", 200, "scm1", 13.0) for i in range(3)]
    rows += [row("meanflow-no-teacher", 400, "scm1", 90.0)]
    cfg = {"pipeline": {"train_steps": 800, "distill_warm_start": 200}, "teacher_samplers": ["ddpm250"],
           "distill_runs": [*({"name": f"meanflow-speed-s{i}", "teacher": f"speed-s{i}", "method": "meanflow"} for i in range(3)),
                            {"name": "meanflow-no-teacher", "teacher": None, "method": "meanflow"}]}
    table = scm_across_teachers(pd.DataFrame(rows), cfg).set_index("model")
    assert list(table.index) == ["teacher", "MeanFlow student (warm start only)", "MeanFlow student (MeanFlow 200 steps)"]
    student = table.loc["MeanFlow student (MeanFlow 200 steps)"]
    half = 4.302652729911275 * 1.0 / np.sqrt(3)
    assert student["FID"] == 6.0 and student["teachers"] == 3 and student["label acc."] == pytest.approx(0.4)
    assert student["FID 95% t-interval"] == f"{6 - half:.2f} – {6 + half:.2f}" == "3.52 – 8.48"
    assert student["FID by teacher"] == "5.00 / 6.00 / 7.00"
    assert table.loc["teacher", "FID"] == 4.5 and table.loc["teacher", "NFE"] == 250
    assert table.loc["MeanFlow student (warm start only)", "FID 95% t-interval"] == "13.00 – 13.00"


def test_the_scm_table_shows_a_student_without_a_teacher_with_no_ratios():
    """scm_table: a teacher's student as FID / teacher (10 / 5 = 2) and FID / ODE (10 / 4 = 2.5), sampling 40 times
    faster (0.4 s against 0.01 s per image); the student without a teacher under teacher "none", its ratios empty."""
    from speedpipe.reporting.tables import scm_table

    def row(run, step, sampler, fid, seconds, nfe=1):
        return {"run": run, "step": step, "sampler": sampler, "FID": fid, "label acc.": 0.5, "nfe": nfe,
                "seconds_per_image": seconds}

    df = pd.DataFrame([row("speed-s0", 800, "ddpm250", 5.0, 0.4, 250), row("speed-s0", 800, "ddim50", 4.0, 0.1, 50),
                       row("sct-speed-s0", 400, "scm1", 10.0, 0.01), row("sct-no-teacher", 400, "scm1", 30.0, 0.01)])
    cfg = {"pipeline": {"train_steps": 800, "distill_warm_start": 200, "teacher_sampler": "ddpm250", "teacher_ode_sampler": "ddim50"},
           "teacher_samplers": ["ddpm250", "ddim50"],
           "distill_runs": [{"name": "sct-speed-s0", "teacher": "speed-s0", "method": "sct"},
                            {"name": "sct-no-teacher", "teacher": None, "method": "sct"}]}
    table = scm_table(df, cfg).set_index(["teacher", "model"])
    student = table.loc[("speed-s0", "sCT student (sCT 200 steps)")]
    assert (student["FID / teacher"], student["FID / ODE"], student["sampling speed-up"]) == (2.0, 2.5, 40.0)
    free = table.loc[("none", "sCT student (sCT 200 steps)")]
    assert free["FID"] == 30.0 and all(pd.isna(free[k]) for k in ("FID / teacher", "FID / ODE", "sampling speed-up"))
    assert list(table.index.get_level_values(0)) == ["speed-s0"] * 3 + ["none"]
