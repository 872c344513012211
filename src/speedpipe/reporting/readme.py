"""The README.md the report writes beside its tables: what was run, the named tables with their figures, the
consistency models against their teachers, the runs of other settings kept, where the time went."""
import json
import platform
from pathlib import Path

import pandas as pd
import torch

from speedpipe import runstore
from speedpipe.consistency.methods import consistency_method
from speedpipe.reporting.tables import as_markdown, scm_across_teachers, students_by_teacher, without_empty_columns
from speedpipe.uncertainty import LEVEL

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
    teachers = [t for t in students_by_teacher(cfg) if t is not None]
    with_teacher = "" if not teachers else f"""Teachers {teachers} at {pipe['train_steps']} iterations; from each, every method of
`consistency_methods` starts from the teacher's weights with the same {pipe['distill_warm_start']}-step TrigFlow warm start
({warm_start}), then takes {pipe['distill_steps']} steps of its own objective.
"""
    without = "" if not pipe["teacher_free"] else f"""Without a teacher (teacher `none` in the tables): {', '.join(pipe['teacher_free'])},
each from base_config's DiT with a {pipe['distill_warm_start']}-step TrigFlow warm start on the data, then
{pipe['distill_steps']} steps of its objective.
"""
    scm_section = "" if scm is None else ("" if not teachers else """
## The teachers

![teacher samples, one row per class](figures/teacher_grid.png)
""") + f"""
## Consistency models{" versus teacher" if teachers else ""}

{with_teacher}{without}
Every student: σ_d = {d['sigma_d']}, P_mean = {d['p_mean']}, P_std = {d['p_std']}, lr {d['lr']}; {pipe['final_samples']}
samples per evaluation. The methods:
{method_lines(cfg)}

![distillation curve](figures/distillation.png)

![teacher and consistency-model samples, one row per class](figures/teacher_vs_scm.png)

{as_markdown(without_empty_columns(scm))}
""" + ("" if len(teachers) < 2 else f"""
Over the teachers (`tables/scm_across_teachers.md`): the mean FID with its t-interval, each teacher's FID.

{as_markdown(without_empty_columns(scm_across_teachers(df, cfg)))}
""")
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
