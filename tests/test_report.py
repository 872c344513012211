"""The report's named tables against hand computations: mean ± std over seeds, the speed-up at the reference's final
FID (interpolated, reached before the first evaluation, never reached), the table's iterations, the files."""
import numpy as np
import pandas as pd
import pytest

from speedpipe.layout import Layout
from speedpipe.stages.report import CURVE_METRICS, named_table, write_table

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
    metrics, speedup = named_table(curve, table)
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
    _, speedup = named_table(curve, {"name": "t", "methods": ["slow", "base"], "reference": None, "steps": [300], "caption": ""})
    assert list(speedup.columns) == ["method", "final FID", "final label acc."] and list(speedup.method) == ["slow", "base"]


def test_table_files_hold_every_part(tmp_path, curve):
    metrics, speedup = named_table(curve, {"name": "t", "methods": ["base", "fast_k"], "reference": "base", "steps": [300], "caption": ""})
    write_table(Layout(tmp_path), "t", "Caption.", ("", "", metrics), ("_speedup", "Speed-up", speedup))
    assert pd.read_csv(tmp_path / "tables/t.csv").shape == (2, 2 + len(CURVE_METRICS))
    assert np.allclose(pd.read_csv(tmp_path / "tables/t_speedup.csv")["speed-up"], [1.0, 1.29])
    markdown = (tmp_path / "tables/t.md").read_text()
    assert markdown.startswith("Caption.") and "**Speed-up**" in markdown and "fast_k" in markdown
    latex = (tmp_path / "tables/t.tex").read_text()
    assert latex.count("\\begin{tabular}") == 2 and "fast\\_k" in latex  # underscores escaped: the file compiles
