"""A finished run judged against its reference output by its conclusions, within tolerances from measured variation.

    python -m speedpipe.check results/demo             # make check: tables/summary.json against expected.json
    python -m speedpipe.check results/demo --record    # this run becomes the reference output (its variation kept)

`expected.json` (tracked beside the experiment's reference output) holds the reference run's summary
(tables/summary.json, written by the report) and the variation measured between runs of the same code: on two machines
(and, where measured, thread counts). A number moved beyond its tolerance when |run - reference| exceeds

    3 x the standard error of the difference of the two seed means (the seeds' own spread, from both runs)
    + the measured machine-to-machine variation (relative for FIDs and speed-ups, absolute for label accuracy)

Timings and images are not compared. Then each conclusion is re-read in the run: who is faster than the reference (the
speed-up on the same side of 1; judged only where the reference's interval over seeds resolved it, else listed as not
judged), the teacher's label accuracy above its bar, each consistency student at least as good as its teacher's ODE and better
than the teacher's DDIM at the student's cost. Exit status 1 when a conclusion fails; numbers that moved are reported
either way.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from speedpipe.sampler_labels import parse_sampler
from speedpipe.uncertainty import sd


def _mean(values) -> float:
    return sum(values) / len(values)


class Judge:
    def __init__(self, variation: dict):
        self.variation, self.numbers, self.conclusions, self.unresolved = variation, [], [], []

    def number(self, what: str, run_values: list, ref_values: list, kind: str):
        """Compare two seed means; kind: fid | speedup (relative machine variation) or label_accuracy (absolute)."""
        run, ref = _mean(run_values), _mean(ref_values)
        seeds = 3 * math.sqrt(sd(run_values) ** 2 / len(run_values) + sd(ref_values) ** 2 / len(ref_values))
        machine = self.variation[kind] * (abs(ref) if kind in ("fid", "speedup") else 1.0)
        tolerance = seeds + machine
        moved = abs(run - ref) > tolerance
        self.numbers.append({"number": what, "reference": round(ref, 4), "run": round(run, 4), "tolerance": round(tolerance, 4),
                             "moved": moved})

    def conclusion(self, claim: str, in_reference: bool, in_run: bool):
        self.conclusions.append({"conclusion": claim, "reference": in_reference, "run": in_run,
                                 "holds": in_run == in_reference})


def judge(run: dict, expected: dict) -> Judge:
    reference, variation, bars = expected["reference"], expected["variation"], expected["bars"]
    j = Judge(variation)
    for name, table in reference["tables"].items():
        mine = run["tables"][name]
        for method, seeds in table["fid"].items():
            for i, step in enumerate(reference["steps"]):
                j.number(f"{name}: {method} FID at {step}", [v[i] for v in mine["fid"][method].values()],
                         [v[i] for v in seeds.values()], "fid")
            j.number(f"{name}: {method} label accuracy at {reference['steps'][-1]}", [mine["label_accuracy"][method]],
                     [table["label_accuracy"][method]], "label_accuracy")
        if table["reference"]:
            for method, speed in table["speedup"].items():
                if method == table["reference"]:
                    continue
                theirs, ours = speed, mine["speedup"][method]
                if theirs["mean_curve"] is not None and ours["mean_curve"] is not None:
                    # seed by seed when every seed's crossing is a value, else the mean curve's (a bound is no value)
                    per_seed = lambda s: s["per_seed"] if s["interval"] else [s["mean_curve"]]  # noqa: E731
                    j.number(f"{name}: {method} speed-up against {table['reference']}", per_seed(ours), per_seed(theirs), "speedup")
                claim = f"{name}: {method} reaches {table['reference']}'s final FID in fewer iterations"
                interval = theirs["interval"]
                if interval is None or interval[0] <= 1 <= interval[1]:
                    j.unresolved.append(f"{claim} (not resolved in the reference: its interval over seeds "
                                        f"{'includes 1' if interval else 'is undefined'})")
                    continue
                faster = lambda s: s["mean_curve"] is not None and s["mean_curve"] > 1  # noqa: E731
                j.conclusion(claim, faster(theirs), faster(ours))
    for teacher, t in reference["teachers"].items():
        mine, has_teacher = run["teachers"][teacher], "samplers" in t  # "none": the students without a teacher
        of = f"of {teacher}" if has_teacher else "without a teacher"
        if has_teacher:
            for sampler, value in t["samplers"].items():
                j.number(f"teacher {teacher} {sampler} FID", [mine["samplers"][sampler]["fid"]], [value["fid"]], "fid")
            accuracy = lambda s: (s["samplers"][s["reference_sampler"]]["label_accuracy"] or 0) >= bars["teacher_label_accuracy"]  # noqa: E731
            j.conclusion(f"teacher {teacher}: {t['reference_sampler']} samples land in their class at least "
                         f"{bars['teacher_label_accuracy']:.0%} of the time", accuracy(t), accuracy(mine))
        for method, student in t["students"].items():
            if method not in mine.get("students", {}):
                j.conclusion(f"{method} student {of} in the run", True, False)
                continue
            last = max(student, key=int)
            mine_student = mine["students"][method]
            for sampler, value in student[last].items():
                j.number(f"{method} student {of} {sampler} FID at {last}", [mine_student[last][sampler]["fid"]],
                         [value["fid"]], "fid")
            if not has_teacher:
                continue
            two_step = lambda s: s[last]["scm2"]["fid"]  # noqa: E731
            ode = lambda s: s["samplers"][s["ode_sampler"]]["fid"]  # noqa: E731
            j.conclusion(f"{method} student of {teacher}: 2-step FID at most its teacher's ODE ({t['ode_sampler']})",
                         two_step(student) <= ode(t), two_step(mine_student) <= ode(mine))
            ddim2 = next((s for s in t["samplers"] if parse_sampler(s).name == "ddim2"), None)
            if ddim2:
                j.conclusion(f"{method} student of {teacher}: 2 steps beat the teacher's {ddim2} (the same cost in steps)",
                             two_step(student) < t["samplers"][ddim2]["fid"], two_step(mine_student) < mine["samplers"][ddim2]["fid"])
    return j


def report(j: Judge) -> str:
    moved = [n for n in j.numbers if n["moved"]]
    lines = [f"{len(j.numbers)} numbers compared, {len(moved)} beyond their tolerance:"]
    lines += [f"  {n['number']}: {n['reference']} -> {n['run']} (tolerance {n['tolerance']})" for n in moved] or ["  (none)"]
    lines.append("conclusions:")
    lines += [f"  {'holds ' if c['holds'] else 'FAILS '} {c['conclusion']} (reference: {c['reference']}, run: {c['run']})"
              for c in j.conclusions]
    lines += [f"  not judged: {u}" for u in j.unresolved]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="an experiment's results folder (results/demo)")
    parser.add_argument("--expected", type=Path, help="default: ROOT/expected.json")
    parser.add_argument("--record", action="store_true", help="write this run's summary as the reference of expected.json, "
                                                              "keeping its measured variation and bars")
    args = parser.parse_args(argv)
    summary = args.root / "tables" / "summary.json"
    expected = args.expected or args.root / "expected.json"
    if args.record:
        from speedpipe.io import atomic_write_text

        kept = json.loads(expected.read_text())
        atomic_write_text(expected, json.dumps({**kept, "reference": json.loads(summary.read_text())}, indent=2))
        print(f"speedpipe check: {summary} recorded as the reference output in {expected}")
        return 0
    for path in (summary, expected):
        if not path.is_file():
            print(f"speedpipe check: {path} not found ({'run the experiment first' if path == summary else 'no reference output'})",
                  file=sys.stderr)
            return 2
    j = judge(json.loads(summary.read_text()), json.loads(expected.read_text()))
    print(report(j))
    return 0 if all(c["holds"] for c in j.conclusions) else 1


if __name__ == "__main__":
    sys.exit(main())
