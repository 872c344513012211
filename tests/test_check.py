"""`speedpipe.check`: a run against its reference output, by numbers within tolerance and by conclusions."""
import copy
import json

from speedpipe.check import judge, main

VARIATION = {"fid": 0.35, "speedup": 0.05, "label_accuracy": 0.10}
BARS = {"teacher_label_accuracy": 0.8}


def summary(speed_final=(4.5, 4.4, 4.6), teacher_accuracy=0.88, student_two_step=1.9):
    steps = [100, 200]
    return {
        "experiment": "x", "seeds": [0, 1, 2], "steps": steps,
        "tables": {"fid": {
            "reference": "baseline", "target": 5.7,
            "fid": {"baseline": {"0": [10.0, 5.6], "1": [10.2, 5.8], "2": [9.8, 5.7]},
                    "speed": {str(i): [9.0, f] for i, f in enumerate(speed_final)}},
            "label_accuracy": {"baseline": 0.31, "speed": 0.40},
            "speedup": {"baseline": {"mean_curve": 1.0, "per_seed": [1.0, 1.0, 1.0], "interval": [1.0, 1.0]},
                        "speed": {"mean_curve": 1.26, "per_seed": [1.25, 1.27, 1.26], "interval": [1.235, 1.285]}
                        if speed_final[0] < 5.7 else {"mean_curve": None, "per_seed": [None, None, None], "interval": None}}}},
        "teachers": {"speed-s0": {
            "reference_sampler": "ddpm250-cfg3", "ode_sampler": "ddim250-cfg3",
            "samplers": {"ddpm250-cfg3": {"fid": 1.6, "label_accuracy": teacher_accuracy}, "ddim250-cfg3": {"fid": 2.4, "label_accuracy": 0.77},
                         "ddim2-cfg3": {"fid": 12.0, "label_accuracy": 0.37}},
            "students": {"scd": {"400": {"scm1": {"fid": 2.8, "label_accuracy": 0.7},
                                         "scm2": {"fid": student_two_step, "label_accuracy": 0.77}}}}}},
    }


def expected(**kw):
    return {"reference": summary(**kw), "variation": VARIATION, "bars": BARS}


def test_the_same_run_holds_every_conclusion_and_moves_nothing():
    j = judge(summary(), expected())
    assert j.numbers and not [n for n in j.numbers if n["moved"]]
    assert j.conclusions and all(c["holds"] for c in j.conclusions)


def test_a_machine_sized_shift_is_within_tolerance_and_a_larger_one_is_reported():
    run = summary()
    run["teachers"]["speed-s0"]["samplers"]["ddpm250-cfg3"]["fid"] = 1.6 * 0.75  # 25 % lower: as on another machine
    assert not [n for n in judge(run, expected()).numbers if n["moved"]]
    run["teachers"]["speed-s0"]["samplers"]["ddpm250-cfg3"]["fid"] = 1.6 * 0.5
    moved = [n["number"] for n in judge(run, expected()).numbers if n["moved"]]
    assert moved == ["teacher speed-s0 ddpm250-cfg3 FID"]


def test_a_conclusion_that_no_longer_holds_fails_the_check(tmp_path, capsys):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables/summary.json").write_text(json.dumps(summary(speed_final=(6.5, 6.4, 6.6), teacher_accuracy=0.5)))
    (tmp_path / "expected.json").write_text(json.dumps(expected()))
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILS  fid: speed reaches baseline's final FID in fewer iterations" in out
    assert "FAILS  teacher speed-s0: ddpm250-cfg3 samples land in their class at least 80% of the time" in out
    assert "holds  scd student of speed-s0: 2-step FID at most its teacher's ODE" in out
    good = copy.deepcopy(summary())
    (tmp_path / "tables/summary.json").write_text(json.dumps(good))
    assert main([str(tmp_path)]) == 0


def test_a_method_whose_student_the_run_lacks_fails_its_conclusion():
    run = summary()
    run["teachers"]["speed-s0"]["students"] = {}
    failed = [c["conclusion"] for c in judge(run, expected()).conclusions if not c["holds"]]
    assert failed == ["scd student of speed-s0 in the run"]


def test_a_speed_up_the_reference_did_not_resolve_is_not_judged():
    reference = expected()
    reference["reference"]["tables"]["fid"]["speedup"]["speed"]["interval"] = [0.9, 1.6]  # includes 1
    j = judge(summary(speed_final=(6.5, 6.4, 6.6)), reference)
    assert not any("fewer iterations" in c["conclusion"] for c in j.conclusions)
    assert j.unresolved and "not resolved in the reference" in j.unresolved[0]


def test_a_teacher_without_label_accuracy_fails_a_bar_the_reference_met():
    """No classifier in the run (label accuracy None) counts as 0, not as meeting the bar."""
    run = summary()
    run["teachers"]["speed-s0"]["samplers"]["ddpm250-cfg3"]["label_accuracy"] = None
    failed = [c["conclusion"] for c in judge(run, expected()).conclusions if not c["holds"]]
    assert failed == ["teacher speed-s0: ddpm250-cfg3 samples land in their class at least 80% of the time"]


def test_record_keeps_the_variation_and_exits_0_and_a_missing_summary_exits_2(tmp_path, capsys):
    (tmp_path / "expected.json").write_text(json.dumps(expected()))
    assert main([str(tmp_path)]) == 2 and "summary.json not found" in capsys.readouterr().err
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables/summary.json").write_text(json.dumps(summary(student_two_step=2.1)))
    assert main([str(tmp_path), "--record"]) == 0
    recorded = json.loads((tmp_path / "expected.json").read_text())
    assert recorded["variation"] == VARIATION and recorded["reference"] == summary(student_two_step=2.1)
