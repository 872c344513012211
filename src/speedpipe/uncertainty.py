"""The uncertainty of the report's claims over seeds: speed-ups per seed and FID differences, with t-intervals.

SpeeD's claim is an iteration ratio at equal FID. Seed by seed, the target is the reference method's final FID in that
seed (the same seed draws the same initialisation and data order for every method, so the comparison is paired and the
reference's own seed-to-seed spread is in it); the method's seed reaches it at an iteration of its own (the linear
interpolation of its FID curve), so each seed has its own speed-up = final iteration / that iteration. With n seeds the
report gives the per-seed values, their mean and standard deviation and the two-sided Student-t interval of the mean
(level 95 %, n - 1 degrees of freedom). With 3 seeds that interval is wide by design (t = 4.30): a bootstrap over 3
values would look narrower without being more honest. A seed whose crossing is only a bound -- reached at or before
the first evaluation (the speed-up is at least final / first), or never reached (at most 1, the run's length) -- makes
the interval of the mean undefined: the report says so and gives the bounds. One seed gives "n = 1, no interval".
FID differences between a method and the reference at an iteration are paired by seed in the same way.
"""
import math
from dataclasses import dataclass

LEVEL = 0.95


def crossing(steps, fids, target) -> tuple[float | None, str]:
    """(iteration at which the linearly interpolated FID curve first reaches target, how): 'interpolated', 'at or before
    the first evaluation' (the iteration is an upper bound, the speed-up a lower one) or 'not reached' (None)."""
    if fids[0] <= target:
        return float(steps[0]), "at or before the first evaluation"
    for (s0, f0), (s1, f1) in zip(zip(steps, fids), zip(steps[1:], fids[1:])):
        if f1 <= target:
            return s0 + (f0 - target) / (f0 - f1) * (s1 - s0), "interpolated"
    return None, "not reached"


def t_interval(values, level: float = LEVEL) -> tuple[float, float] | None:
    """The Student-t interval of the mean of `values` (None for fewer than two)."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    half = t.ppf(0.5 + level / 2, n - 1) * sd(values) / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class SeedSpeedups:
    """A method's speed-up against a target FID, seed by seed."""
    values: tuple[float | None, ...]  # final / crossing iteration per seed (None: never reached)
    how: tuple[str, ...]  # per seed: interpolated | at or before the first evaluation | not reached

    @property
    def exact(self) -> bool:
        return all(h == "interpolated" for h in self.how)

    @property
    def interval(self) -> tuple[float, float] | None:
        return t_interval(list(self.values)) if self.exact else None

    def mean_sd(self) -> tuple[float, float] | None:
        return (sum(self.values) / len(self.values), sd(self.values)) if self.exact else None

    def summary(self) -> str:
        """'per seed 1.21, 1.25, 1.31; mean 1.26 ± 0.05, 95% t-interval 1.13-1.38', or why there is no interval."""
        per_seed = ", ".join(_bound(v, h) for v, h in zip(self.values, self.how))
        if len(self.values) == 1:
            return f"{per_seed} (n = 1, no interval)"
        if not self.exact:
            return f"per seed {per_seed}: no interval (a seed's crossing is only a bound)"
        mean, sd = self.mean_sd()
        low, high = self.interval
        return f"per seed {per_seed}; mean {mean:.2f} ± {sd:.2f}, {LEVEL:.0%} t-interval {low:.2f}-{high:.2f}"

    def interval_text(self) -> str:
        """'1.13-1.38', or why there is none."""
        if len(self.values) == 1:
            return "n = 1, no interval"
        interval = self.interval
        return "bounds only" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"

    def separable(self) -> str:
        """Whether the interval excludes 1.0 (the reference's own speed)."""
        if len(self.values) == 1:
            return "n = 1, no interval"
        interval = self.interval
        if interval is None:
            low_bounds = [v for v, h in zip(self.values, self.how) if h == "at or before the first evaluation"]
            if len(low_bounds) == len(self.values) and min(low_bounds) > 1:
                return "yes (every seed faster than a bound above 1)"
            return "unknown (bounds only)"
        return "yes" if interval[0] > 1.0 or interval[1] < 1.0 else "no: the interval includes 1.0"


def sd(values) -> float:
    """The sample standard deviation (n - 1), 0 for one value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _bound(value, how) -> str:
    if how == "not reached":
        return "< 1 (not reached)"
    if how == "at or before the first evaluation":
        return f"≥ {value:.2f}"
    return f"{value:.2f}"


def seed_speedups(curves: dict[int, tuple[list, list]], targets: dict[int, float], final_step: float) -> SeedSpeedups:
    """curves: seed -> (steps, FIDs) of a method; targets: seed -> the reference's final FID in that seed."""
    values, how = [], []
    for seed in sorted(set(curves) & set(targets)):
        steps, fids = curves[seed]
        reached, kind = crossing(steps, fids, targets[seed])
        values.append(None if reached is None else final_step / reached)
        how.append(kind)
    return SeedSpeedups(tuple(values), tuple(how))


def budget_speedups(curves: dict[int, tuple[list, list]], reference: dict[int, tuple[list, list]],
                    budgets) -> dict[int, SeedSpeedups]:
    """The speed-up as a function of the training budget: for each budget B (an evaluated iteration), seed by seed, B
    over the iteration at which the method's curve reaches the reference's FID at B in the same seed (SpeeD's figure:
    the iterations the baseline needs at B against those the method needs for the same FID)."""
    result = {}
    for budget in budgets:
        targets = {seed: fids[list(steps).index(budget)] for seed, (steps, fids) in reference.items() if budget in steps}
        result[budget] = seed_speedups(curves, targets, budget)
    return result


def paired_difference(method: dict[int, float], reference: dict[int, float]) -> tuple[float, tuple[float, float] | None, int]:
    """(mean of method - reference over the seeds both have, its t-interval or None, n)."""
    seeds = sorted(set(method) & set(reference))
    differences = [method[s] - reference[s] for s in seeds]
    return sum(differences) / len(differences), t_interval(differences), len(differences)
