"""Each formula against a hand computation on a few numbers (METHODS.md's equations and the report's statistics).

The numbers are worked out here with math/numpy from the equation as written in METHODS.md or the docstring, never by
calling the code under test, so a constant off by a factor, a reciprocal, a swapped pair or a dropped term fails.
Mixture and end-to-end tests elsewhere judge outcomes; these pin the arithmetic. `tests/mutation_check.py
--mechanical` mutates every literal and operator of the formula modules against these tests first.
"""
import math

import numpy as np
import pytest
import torch

from speedpipe.check import Judge, judge
from speedpipe.consistency.objectives import (ConsistencyLoss, LogvarHead, TrigFlowDiffusionLoss, adaptive_loss, data_velocity,
                                              sample_time, trigflow_point)
from speedpipe.consistency.trigflow import ContinuousIndex, TrigFlowStudent, TrigFlowTeacher, t_max
from speedpipe.training import StepRandomness, update_ema, warmup_lr
from speedpipe.uncertainty import SeedSpeedups, budget_speedups, crossing, paired_difference, sd, seed_speedups, t_interval

T975_2, T95_2, T975_1 = 4.302652729911275, 2.919985580355516, 12.706204736174705  # Student-t quantiles (tables)


# ----- the report's statistics (speedpipe.uncertainty) -----

def test_crossing_interpolates_linearly_between_the_two_evaluations_around_the_target():
    steps, fids = [100, 200, 400], [30.0, 22.0, 12.0]
    assert crossing(steps, fids, 19.0) == (200 + (22 - 19) / (22 - 12) * 200, "interpolated")  # 260
    assert crossing(steps, fids, 26.0) == (100 + (30 - 26) / (30 - 22) * 100, "interpolated")  # 150
    assert crossing(steps, fids, 22.0) == (200.0, "interpolated")  # reached exactly at an evaluation
    assert crossing(steps, fids, 31.0) == (100.0, "at or before the first evaluation")
    assert crossing(steps, fids, 11.0) == (None, "not reached")


def test_sample_standard_deviation_and_t_interval_by_hand():
    values = [1.0, 2.0, 4.0]  # mean 7/3; squared deviations 16/9, 1/9, 25/9: sum 42/9, over n - 1 = 2: 7/3
    assert sd(values) == pytest.approx(math.sqrt(7 / 3), rel=1e-12)
    assert sd([5.0]) == 0.0
    half = T975_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert t_interval(values) == pytest.approx((7 / 3 - half, 7 / 3 + half), rel=1e-9)
    half90 = T95_2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert t_interval(values, level=0.90) == pytest.approx((7 / 3 - half90, 7 / 3 + half90), rel=1e-9)
    half2 = T975_1 * math.sqrt(0.5) / math.sqrt(2)  # two values 1 and 2: sd √0.5, 1 degree of freedom
    assert t_interval([1.0, 2.0]) == pytest.approx((1.5 - half2, 1.5 + half2), rel=1e-9)
    assert t_interval([3.0]) is None


def test_seed_speedups_are_the_final_step_over_each_seeds_crossing():
    curves = {0: ([100, 200, 400], [30.0, 22.0, 12.0]), 1: ([100, 200, 400], [28.0, 18.0, 10.0]), 5: ([100], [1.0])}
    s = seed_speedups(curves, {0: 19.0, 1: 14.0}, 400)  # seed 5 has no target: left out
    assert s.values == pytest.approx((400 / 260, 400 / (200 + 4 / 8 * 200))) and s.how == ("interpolated",) * 2
    mean, spread = s.mean_sd()
    a, b = 400 / 260, 400 / 300
    assert mean == pytest.approx((a + b) / 2) and spread == pytest.approx(abs(a - b) / math.sqrt(2))
    half = T975_1 * abs(a - b) / math.sqrt(2) / math.sqrt(2)
    assert s.interval == pytest.approx(((a + b) / 2 - half, (a + b) / 2 + half))


@pytest.mark.parametrize("values,how,expected", [
    ((1.5, 1.6, 1.7), ("interpolated",) * 3, "yes"),
    ((0.5, 0.6, 0.7), ("interpolated",) * 3, "yes"),  # slower than the reference, resolved
    ((0.9, 1.0, 1.1), ("interpolated",) * 3, "no: the interval includes 1.0"),
    ((1.9, 2.0, 2.1), ("interpolated",) * 3, "yes"),  # an interval around 2 is resolved from 1
    ((1.2, 1.3), ("at or before the first evaluation",) * 2, "yes (every seed faster than a bound above 1)"),
    ((1.0, 1.3), ("at or before the first evaluation",) * 2, "unknown (bounds only)"),  # a bound of 1 says nothing
    ((1.5, 1.3), ("at or before the first evaluation", "interpolated"), "unknown (bounds only)"),
    ((1.5,), ("interpolated",), "n = 1, no interval"),
])
def test_a_speed_up_is_separable_from_one_only_where_its_interval_or_every_bound_excludes_one(values, how, expected):
    assert SeedSpeedups(values, how).separable() == expected


def test_the_speed_up_at_a_budget_targets_the_references_fid_at_that_budget_seed_by_seed():
    reference = {0: ([100, 200, 400], [40.0, 30.0, 20.0]), 1: ([100, 200, 400], [44.0, 34.0, 24.0])}
    method = {0: ([100, 200, 400], [35.0, 25.0, 15.0]), 1: ([100, 200, 400], [40.0, 28.0, 18.0])}
    at = budget_speedups(method, reference, [200, 400])
    # B = 200: targets 30 and 34; seed 0 reaches 30 at 100 + 5/10·100 = 150, seed 1 reaches 34 at 100 + 6/12·100 = 150
    assert at[200].values == pytest.approx((200 / 150, 200 / 150))
    # B = 400: targets 20 and 24; seed 0 at 200 + 5/10·200 = 300, seed 1 at 200 + 4/10·200 = 280
    assert at[400].values == pytest.approx((400 / 300, 400 / 280))


def test_paired_difference_over_the_seeds_both_have():
    mean, interval, n = paired_difference({0: 5.0, 1: 7.0, 2: 12.0}, {0: 4.0, 1: 4.0, 2: 6.0, 3: 1.0})
    assert (mean, n) == (pytest.approx(10 / 3), 3)  # differences 1, 3, 6
    half = T975_2 * math.sqrt(((1 - 10 / 3) ** 2 + (3 - 10 / 3) ** 2 + (6 - 10 / 3) ** 2) / 2) / math.sqrt(3)
    assert interval == pytest.approx((10 / 3 - half, 10 / 3 + half))


# ----- make check's tolerance (speedpipe.check) -----

def test_a_numbers_tolerance_is_three_standard_errors_of_the_difference_plus_the_machines_variation():
    j = Judge({"fid": 0.1, "speedup": 0.05, "label_accuracy": 0.02})
    run, ref = [10.00017, 11.00017, 12.00017], [9.00123, 9.50123, 10.50123, 11.00123]  # sd 1 over 3 seeds; the reference's over 4
    ref_mean = 10.00123
    ref_sd = math.sqrt((1 + 0.25 + 0.25 + 1) / 3)
    expected = 3 * math.sqrt(1.0 ** 2 / 3 + ref_sd ** 2 / 4) + 0.1 * ref_mean
    j.number("fid", run, ref, "fid")
    j.number("speed-up", [-1.0, -2.0], [-2.0, -3.0], "speedup")  # relative to |reference|
    j.number("accuracy", [0.5], [0.9], "label_accuracy")  # absolute, one seed each: no seed term
    fid, speedup, accuracy = j.numbers
    assert fid["tolerance"] == round(expected, 4) and fid["run"] == 11.0002 and fid["reference"] == 10.0012  # kept to 4 decimals
    assert speedup["tolerance"] == round(3 * math.sqrt(0.5 / 2 + 0.5 / 2) + 0.05 * 2.5, 4)
    assert accuracy["tolerance"] == 0.02 and accuracy["moved"]
    assert not fid["moved"] and not speedup["moved"]


@pytest.mark.parametrize("shift,moved", [(0.99, False), (1.01, True)])
def test_a_number_moves_exactly_when_the_difference_exceeds_its_tolerance(shift, moved):
    j = Judge({"fid": 0.2, "speedup": 0.0, "label_accuracy": 0.0})
    tolerance = 0.2 * 5.0  # one seed each: the machine's variation alone
    j.number("fid", [5.0 - shift * tolerance], [5.0], "fid")
    assert j.numbers[0]["moved"] is moved


def test_a_speed_up_the_reference_resolved_around_two_is_judged():
    """A reference interval 1.5-2.5 excludes 1: the claim is judged (one that includes 1 is not, test_check)."""
    from test_check import expected, summary

    reference = expected()
    reference["reference"]["tables"]["fid"]["speedup"]["speed"]["interval"] = [1.5, 2.5]
    j = judge(summary(), reference)
    assert [c["conclusion"] for c in j.conclusions if "fewer iterations" in c["conclusion"]] and not j.unresolved


# ----- training (speedpipe.training) -----

def test_warmup_is_linear_from_zero_and_then_constant():
    assert warmup_lr(0.3, 4, 1) == pytest.approx(0.075) and warmup_lr(0.3, 4, 3) == pytest.approx(0.225)
    assert warmup_lr(0.3, 4, 4) == 0.3 and warmup_lr(0.3, 4, 9) == 0.3 and warmup_lr(0.3, 0, 1) == 0.3


def test_the_ema_is_decay_times_itself_plus_one_minus_decay_times_the_weights():
    ema, weights = [torch.tensor([1.0, -2.0])], [torch.tensor([3.0, 4.0])]
    update_ema(ema, weights, 0.75)
    assert torch.allclose(ema[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 4]))


def test_a_steps_flips_are_fair_coins_and_its_drops_follow_the_dropout_rate():
    class Uniform:
        def sample(self, n, generator, step):
            return torch.zeros(n, dtype=torch.long)

    _, drop, flip, _, _ = StepRandomness(0, Uniform(), (1,), 0.2, True, False, "cpu").draw(100_000, 1)
    assert flip.float().mean().item() == pytest.approx(0.5, abs=0.01) and drop.float().mean().item() == pytest.approx(0.2, abs=0.01)


# ----- the consistency objectives (METHODS.md §4) -----

def test_time_proposal_is_arctan_of_e_tau_over_sigma_d():
    tau = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy() * 1.4 - 1.0
    t = sample_time(5, 0.5, -1.0, 1.4, generator=torch.Generator().manual_seed(4)).numpy()
    assert np.allclose(np.tan(t), np.exp(tau) / 0.5, rtol=1e-12)


def test_trigflow_point_velocity_and_t_max_by_hand():
    x0, z, t = (torch.tensor(v, dtype=torch.float64) for v in ([[0.3]], [[-0.7]], [0.5]))
    x_t, t64 = trigflow_point(x0, z, t)
    assert x_t.item() == pytest.approx(math.cos(0.5) * 0.3 + math.sin(0.5) * -0.7, rel=1e-12) and t64.dtype == torch.float64
    assert data_velocity(x0, z, t64).item() == pytest.approx(math.cos(0.5) * -0.7 - math.sin(0.5) * 0.3, rel=1e-12)
    assert t_max(80.0, 0.5) == pytest.approx(math.atan(160.0))


def test_adaptive_weighting_is_e_minus_logvar_over_d_times_the_error_plus_logvar():
    loss = adaptive_loss(torch.tensor([2.0, 8.0]), torch.tensor([0.0, math.log(2.0)]), 4)
    assert loss.item() == pytest.approx(((2.0 / 4 + 0.0) + (8.0 / 2 / 4 + math.log(2.0))) / 2)


class Linear(torch.nn.Module):
    """F(x, c) = a·x + b·c (per element, any shape): a network whose value and derivative are known by hand."""

    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, c, y):
        return self.a * x + self.b * c.view(-1, *([1] * (x.ndim - 1)))


def _pair():
    g = torch.Generator().manual_seed(7)
    x0, z = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    return x0, z, torch.tensor([0.3, 0.8, 1.3], dtype=torch.float64), torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize("step", [1, 3, 8])
def test_consistency_loss_by_hand_with_a_linear_student(step):
    """g = −cos²t·(σ_d F⁻ − v) − r·(cos t sin t·x_t + σ_d·cos t sin t·dF/dt), dF/dt = a·v/σ_d + b·time_scale,
    g/(‖g‖ + c), L = mean(e^{−logvar}/D·‖F − F⁻ − g‖² + logvar) with logvar 0 (a zero-initialised head)."""
    sigma_d, time_scale, a, b, H, c = 0.6, 1.5, 0.4, -0.3, 4, 0.2
    student = TrigFlowStudent(Linear(a, b), sigma_d=sigma_d, time_scale=time_scale)
    x0, z, t, y = _pair()
    velocity = lambda x0, z, x_t, t, y, sd: 0.5 * x_t + 0.1  # noqa: E731
    terms = ConsistencyLoss(velocity, tangent_warmup=H, tangent_c=c)(student, LogvarHead().double(), x0, z, t, y, step)
    cos, sin = np.cos(t.numpy())[:, None, None, None], np.sin(t.numpy())[:, None, None, None]
    x_t = cos * x0.numpy() + sin * z.numpy()
    v = 0.5 * x_t + 0.1
    F = a * x_t / sigma_d + b * time_scale * t.numpy()[:, None, None, None]
    dF_dt = a * v / sigma_d + b * time_scale
    r = min(1.0, step / H)
    raw = -cos**2 * (sigma_d * F - v) - r * (cos * sin * x_t + sigma_d * cos * sin * dF_dt)
    norm = np.sqrt((raw**2).reshape(3, -1).sum(1))
    g = raw / (norm[:, None, None, None] + c)
    # the network passes see fp32 inputs (the objective's choice): agreement to ~1e-7
    assert np.allclose(terms["g"].numpy(), g, rtol=1e-6, atol=1e-7)
    assert terms["tangent_norm"].item() == pytest.approx(norm.mean(), rel=1e-6)
    sq = (g**2).reshape(3, -1).sum(1)
    assert terms["loss"].item() == pytest.approx((sq / 8).mean(), rel=1e-6) and terms["mse"].item() == pytest.approx((sq / 8).mean(), rel=1e-6)


@pytest.mark.parametrize("target", ["data", "teacher"])
def test_the_warm_start_regresses_F_on_the_data_velocity_over_sigma_d_or_on_the_teachers_F(target):
    sigma_d, a, b = 0.6, 0.4, -0.3
    student = TrigFlowStudent(Linear(a, b), sigma_d=sigma_d, time_scale=1.0)
    teacher = lambda x_scaled, t, y: 2.0 * x_scaled - 0.25  # noqa: E731
    x0, z, t, y = _pair()
    terms = TrigFlowDiffusionLoss(teacher, target)(student, LogvarHead().double(), x0, z, t, y, 1)
    cos, sin = np.cos(t.numpy())[:, None, None, None], np.sin(t.numpy())[:, None, None, None]
    x_t = cos * x0.numpy() + sin * z.numpy()
    F = a * x_t / sigma_d + b * t.numpy()[:, None, None, None]
    wanted = (cos * z.numpy() - sin * x0.numpy()) / sigma_d if target == "data" else 2.0 * x_t / sigma_d - 0.25
    mse = ((F - wanted) ** 2).reshape(3, -1).sum(1) / 8
    assert terms["mse"].item() == pytest.approx(mse.mean(), rel=1e-6) and terms["loss"].item() == pytest.approx(mse.mean(), rel=1e-6)


def test_logvar_weighting_reaches_the_loss():
    """A head with logvar(t) = 0.7 everywhere: L = e^{−0.7}/D·‖·‖² + 0.7."""
    student = TrigFlowStudent(Linear(0.4, -0.3), sigma_d=0.6, time_scale=1.0)
    head = LogvarHead().double()
    torch.nn.init.constant_(head.linear.bias, 0.7)
    x0, z, t, y = _pair()
    plain = TrigFlowDiffusionLoss(None, "data")(student, LogvarHead().double(), x0, z, t, y, 1)
    weighted = TrigFlowDiffusionLoss(None, "data")(student, head, x0, z, t, y, 1)
    assert weighted["loss"].item() == pytest.approx(math.exp(-0.7) * plain["mse"].item() + 0.7, rel=1e-9)



def test_each_sample_is_weighted_by_the_logvar_of_its_own_time():
    """A head whose logvar varies with t: the batch's loss is mean_i(e^{−logvar(t_i)}/D·‖·‖²_i + logvar(t_i)), each sample
    with its own time's logvar (logvar(t_i) and ‖·‖²_i/D taken from one-sample batches), not every pairing of the two."""
    student = TrigFlowStudent(Linear(0.4, -0.3), sigma_d=0.6, time_scale=1.0)
    head = LogvarHead(dim=8).double()
    torch.nn.init.normal_(head.linear.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    x0, z, t, y = _pair()
    loss = TrigFlowDiffusionLoss(None, "data")
    expected = 0.0
    for i in range(3):
        one = slice(i, i + 1)
        logvar = head(student.c_noise(t[one].float())).item()  # the time input in float32, as the objective gives it
        error = loss(student, LogvarHead(dim=8).double(), x0[one], z[one], t[one], y[one], 1)["mse"].item()
        expected += (math.exp(-logvar) * error + logvar) / 3
    logvars = head(student.c_noise(t))
    assert logvars.shape == (3,) and logvars.std() > 0.1  # the times are told apart
    assert loss(student, head, x0, z, t, y, 1)["loss"].item() == pytest.approx(expected, rel=1e-9)

class EpsilonOfIndex(torch.nn.Module):
    """ε̂(x_n, n, y) = 0.1·x_n + 0.01·n·(y + 1): depends on the continuous index and the label."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_n, n, y):
        return 0.1 * x_n + 0.01 * (n * (y + 1)).view(-1, 1)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0, 3.0])  # 1: the unguided shortcut; 2 and 3: guided
def test_teacher_conversion_by_hand_on_a_three_step_table(cfg_scale):
    """METHODS.md §4 with L = latent_scale: σ = (σ_d/L)·tan t, ᾱ* = 1/(1 + σ²), n* from log ᾱ between the table's entries,
    x_n = √ᾱ*·x_t/(L cos t), ε̂ = net(x_n, n*) (guided: ε̂_u + s(ε̂_c − ε̂_u)), x̂0 = (x_n − √(1−ᾱ*)ε̂)/√ᾱ*,
    F = cos t·ε̂ − sin t·L·x̂0/σ_d."""
    table = np.array([0.9, 0.5, 0.1])
    sigma_d, L, t, x_scaled, y = 0.5, 0.8, 0.6, 1.3, 2
    teacher = TrigFlowTeacher(EpsilonOfIndex(), table, sigma_d=sigma_d, cfg_scale=cfg_scale, latent_scale=L)
    F = teacher(torch.tensor([[x_scaled]], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), torch.tensor([y])).item()
    sigma = sigma_d / L * math.tan(t)
    ab = 1 / (1 + sigma**2)
    log_table = np.log(table)
    n = 0 + (log_table[0] - math.log(ab)) / (log_table[0] - log_table[1])
    assert 0 < n < 1
    x_n = math.sqrt(ab) * sigma_d * x_scaled / (L * math.cos(t))
    cond, uncond = 0.1 * x_n + 0.01 * n * (y + 1), 0.1 * x_n + 0.01 * n * (4 + 1)
    eps = uncond + cfg_scale * (cond - uncond)
    x0 = (x_n - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    assert F == pytest.approx(math.cos(t) * eps - math.sin(t) * L * x0 / sigma_d, rel=1e-10)


def test_continuous_index_is_piecewise_linear_in_log_alpha_bar_and_extrapolates():
    index = ContinuousIndex(np.array([0.9, 0.5, 0.1]))
    la = np.log([0.9, 0.5, 0.1])
    points = torch.tensor([math.log(0.7), math.log(0.2), math.log(0.95), math.log(0.05)], dtype=torch.float64)
    expected = [(la[0] - math.log(0.7)) / (la[0] - la[1]), 1 + (la[1] - math.log(0.2)) / (la[1] - la[2]),
                (la[0] - math.log(0.95)) / (la[0] - la[1]), 1 + (la[1] - math.log(0.05)) / (la[1] - la[2])]
    assert index.index(points).tolist() == pytest.approx(expected, rel=1e-12)
    n = torch.tensor([0.25, 1.5, 2.0], dtype=torch.float64)
    assert index.log_alpha_bar(n).tolist() == pytest.approx([la[0] + 0.25 * (la[1] - la[0]), la[1] + 0.5 * (la[2] - la[1]), la[2]])


def test_the_consistency_function_is_cos_t_x_minus_sin_t_sigma_d_F():
    student = TrigFlowStudent(Linear(0.4, -0.3), sigma_d=0.6, time_scale=2.0)
    x_t, t = torch.tensor([[0.9]], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    F = 0.4 * 0.9 / 0.6 - 0.3 * 2.0 * 0.7
    assert student.consistency(x_t, t, None).item() == pytest.approx(math.cos(0.7) * 0.9 - math.sin(0.7) * 0.6 * F)


# ----- timestep samplers and loss weightings (METHODS.md §2-3), on a three-step diffusion -----

@pytest.fixture
def three_steps():
    """β = 0.1, 0.2, 0.5: ᾱ = 0.9, 0.72, 0.36, SNR = ᾱ/(1 - ᾱ) = 9, 18/7, 9/16."""
    from speedpipe.diffusion.gaussian import GaussianDiffusion

    return GaussianDiffusion(np.array([0.1, 0.2, 0.5]))


SNR3 = np.array([9.0, 18 / 7, 9 / 16])


def test_the_three_step_diffusion_by_hand(three_steps):
    assert three_steps.alphas_cumprod == pytest.approx([0.9, 0.72, 0.36]) and three_steps.snr == pytest.approx(SNR3)


def test_p2_min_snr_and_sigmoid_weights_by_hand(three_steps):
    from speedpipe.diffusion.timesteps import build_weighting

    assert build_weighting("p2", three_steps, k=2.0, gamma=0.5).numpy() == pytest.approx(1 / np.sqrt(2 + SNR3), rel=1e-6)
    assert build_weighting("min_snr", three_steps, gamma=2.0).numpy() == pytest.approx([2 / 9, 2 / (18 / 7), 1.0], rel=1e-6)
    lam = np.log(SNR3)
    minus_dlam = np.array([lam[0] - lam[1], (lam[0] - lam[2]) / 2, lam[1] - lam[2]])  # central differences, one-sided at the ends
    for b in (0.0, 1.5):
        w = 1 / (1 + np.exp(-(b - lam))) * minus_dlam
        assert build_weighting("sigmoid", three_steps, b=b).numpy() == pytest.approx(w / w.mean(), rel=1e-6)


def test_speed_weights_by_hand(three_steps):
    """1 - ᾱ = 0.1, 0.28, 0.64: gradient 0.18, 0.27, 0.36, rescaled 0, 1/2, 1; λ = 0.7, τ = 2: w = 0.3 + 0.4·ĝ before τ, 1 after."""
    from speedpipe.diffusion.timesteps import build_weighting

    assert build_weighting("speed", three_steps, lam=0.7, tau=2).numpy() == pytest.approx([0.3, 0.5, 1.0], rel=1e-6)
    assert build_weighting("speed", three_steps, lam=0.7, tau=3).numpy() == pytest.approx([0.3, 0.5, 0.7], rel=1e-6)


def test_speed_sampler_probabilities_by_hand(three_steps):
    from speedpipe.diffusion.timesteps import build_sampler

    probs = build_sampler("speed", three_steps, k=4.0, tau=2, dual=False).probs.numpy()
    assert probs == pytest.approx([4 / 9, 4 / 9, 1 / 9])  # ∝ k before τ, 1 after, over T + τ(k - 1) = 9


@pytest.mark.parametrize("k, tau, expected", [(0.5, 1, [0.2, 0.4, 0.4]), (4.0, 3, [1 / 3, 1 / 3, 1 / 3])])
def test_speed_sampler_at_the_ends_of_its_valid_values(three_steps, k, tau, expected):
    """τ from 1 to T and any k > 0 are valid (k < 1 favours the convergence area): p ∝ k before τ, 1 after, over
    T + τ(k − 1): 0.5/2.5 and 1/2.5 for k = 0.5, τ = 1; uniform for τ = T (every step before τ)."""
    from speedpipe.diffusion.timesteps import build_sampler

    assert build_sampler("speed", three_steps, k=k, tau=tau, dual=False).probs.numpy() == pytest.approx(expected)
    for bad in ({"k": 0.0, "tau": 2}, {"k": 4.0, "tau": 0}, {"k": 4.0, "tau": 4}):
        with pytest.raises(ValueError, match="must"):
            build_sampler("speed", three_steps, dual=False, **bad)


@pytest.mark.parametrize("n", [4, 5])
def test_speed_dual_distribution_by_hand(n):
    """⌊n/2⌋ + 1 direct draws and n - that many mirrors (m = 642): P(t) = (draws·p_t + mirrors·p_mirror(t))/n."""
    from speedpipe.diffusion import create_diffusion
    from speedpipe.diffusion.timesteps import build_sampler

    sampler = build_sampler("speed", create_diffusion(""), k=5.0, tau=700, dual=True)
    direct, mirrors = n // 2 + 1, n - (n // 2 + 1)
    low, high = 5 / (1000 + 700 * 4), 1 / (1000 + 700 * 4)
    dist = sampler.distribution(n).numpy()
    assert dist[0] == pytest.approx((direct * low + mirrors * low) / n)  # 0 mirrors 642 (< τ)
    assert dist[10] == pytest.approx((direct * low + mirrors * (low + low)) / n)  # from 632 and 652
    assert dist[300] == pytest.approx((direct * low + mirrors * (low + high)) / n)  # from 342 and 942 (≥ τ)
    assert dist[800] == pytest.approx(direct * high / n)  # above m only the direct draws
    assert dist.sum() == pytest.approx(1.0)


def test_lognormal_and_logit_normal_masses_by_hand(three_steps):
    """Each step owns the interval of its centre between the midpoints to its neighbours: log σ_t = ½ log((1-ᾱ)/ᾱ)
    under N(P_mean, P_std²); u_t = -½ log SNR_t under N(m, s²)."""
    from scipy.stats import norm

    from speedpipe.diffusion.timesteps import build_sampler

    for name, params, centres, (mean, std) in (
            ("lognormal", {"p_mean": -0.4, "p_std": 0.7}, 0.5 * np.log(1 / SNR3), (-0.4, 0.7)),
            ("logit_normal", {"m": 0.3, "s": 1.7}, -0.5 * np.log(SNR3), (0.3, 1.7))):
        edges = [(centres[0] + centres[1]) / 2, (centres[1] + centres[2]) / 2]
        cdf = norm.cdf(edges, loc=mean, scale=std)
        expected = [cdf[0], cdf[1] - cdf[0], 1 - cdf[1]]
        assert build_sampler(name, three_steps, **params).probs.numpy() == pytest.approx(expected, rel=1e-9), name



# ----- the VLB's pieces (ADM's improved-DDPM code, METHODS.md §1) -----

def _approx_cdf(u):
    """ADM's tanh approximation of the standard normal cdf, written out."""
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))


def test_the_approximate_normal_cdf_is_the_tanh_formula_and_within_3e4_of_phi():
    from scipy.stats import norm

    from speedpipe.diffusion.gaussian import approx_standard_normal_cdf

    u = np.array([-2.5, -1.0, 0.0, 0.3, 1.0, 2.0])
    ours = approx_standard_normal_cdf(torch.tensor(u, dtype=torch.float64)).numpy()
    assert ours == pytest.approx(_approx_cdf(u), rel=1e-12) and np.abs(ours - norm.cdf(u)).max() < 3e-4


def test_the_discretised_decoder_likelihood_by_hand():
    """log P(x) of a Gaussian discretised to 256 bins of width 2/255 on [-1, 1]: log(Φ(x⁺) − Φ(x⁻)) inside, with the
    edge bins open to -∞ (x < -0.999: log Φ(x⁺)) and +∞ (x > 0.999: log(1 − Φ(x⁻))), each floored at 1e-12."""
    from speedpipe.diffusion.gaussian import discretized_gaussian_log_likelihood

    x = np.array([0.2, -0.9995, 0.9995, -1.0, 1.0, 0.9])
    mean = np.array([0.1, -0.9995, 0.9995, 1.0, -1.0, -0.9])
    scale = np.array([0.05, 0.05, 0.05, 0.01, 0.01, 0.01])
    plus, minus = _approx_cdf((x - mean + 1 / 255) / scale), _approx_cdf((x - mean - 1 / 255) / scale)
    expected = np.log(np.maximum([plus[0] - minus[0], plus[1], 1 - minus[2], plus[3], 1 - minus[4], plus[5] - minus[5]], 1e-12))
    assert expected[3:] == pytest.approx([math.log(1e-12)] * 3)  # far off: each branch at its floor
    ours = discretized_gaussian_log_likelihood(*(torch.tensor(v, dtype=torch.float64) for v in (x, mean, np.log(scale))))
    assert ours.numpy() == pytest.approx(expected, rel=1e-9)


def test_normal_kl_by_hand():
    """KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) = log(σ2/σ1) + (σ1² + (μ1 − μ2)²)/(2σ2²) − 1/2."""
    from speedpipe.diffusion.gaussian import normal_kl

    m1, lv1, m2, lv2 = 0.3, 0.2, -0.1, -0.4
    s1, s2 = math.exp(lv1 / 2), math.exp(lv2 / 2)
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item() == pytest.approx(expected, rel=1e-12)


def test_vlb_terms_in_bits_by_hand(three_steps):
    """L_t = KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t))/ln 2 per dimension for t > 0, the decoder's −log P(x_0)/ln 2 at
    t = 0; p's mean from x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ through the posterior's coefficients, its log-variance
    f·log β + (1 − f)·log β̃ (β̃_0 := β̃_1), f = (v + 1)/2; the loss w_t·MSE + L_t (METHODS.md §1)."""
    beta = np.array([0.1, 0.2, 0.5])
    ab = np.cumprod(1 - beta)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = beta * (1 - ab_prev) / (1 - ab)
    log_post = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = beta * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    eps_hat, v = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64), torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 2])
    weights = torch.tensor([0.5, 2.0, 3.0])
    x_t = three_steps.q_sample(x0, t, noise)
    X0, N, E, V, XT = (a.numpy()[:, 0] for a in (x0, noise, eps_hat, v, x_t))
    col = lambda a: a[:, None, None]  # noqa: E731
    assert XT == pytest.approx(col(np.sqrt(ab)) * X0 + col(np.sqrt(1 - ab)) * N, rel=1e-6)
    true_mean = col(coef1) * X0 + col(coef2) * XT
    x0_hat = (XT - col(np.sqrt(1 - ab)) * E) / col(np.sqrt(ab))
    mean = col(coef1) * x0_hat + col(coef2) * XT
    f = (V + 1) / 2
    log_var = f * col(np.log(beta)) + (1 - f) * col(log_post)
    kl = 0.5 * (-1 + log_var - col(log_post) + np.exp(col(log_post) - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    plus = _approx_cdf((X0 - mean + 1 / 255) / np.exp(0.5 * log_var))
    minus = _approx_cdf((X0 - mean - 1 / 255) / np.exp(0.5 * log_var))
    log_p = np.where(X0 < -0.999, np.log(plus), np.where(X0 > 0.999, np.log(1 - minus), np.log(np.maximum(plus - minus, 1e-12))))
    vb = np.where(np.arange(3) == 0, -log_p.reshape(3, -1).mean(1), kl.reshape(3, -1).mean(1)) / math.log(2)
    mse = ((N - E) ** 2).reshape(3, -1).mean(1)
    terms = three_steps.training_losses(torch.cat([eps_hat, v], dim=1), x0, x_t, t, noise, weights)
    assert terms["vb"].numpy() == pytest.approx(vb, rel=1e-5) and terms["mse"].numpy() == pytest.approx(mse, rel=1e-6)
    assert terms["loss"].numpy() == pytest.approx(weights.numpy() * mse + vb, rel=1e-5)


def test_fixed_variance_without_learned_sigma_is_beta_with_the_posterior_variance_at_t0():
    """ADM's "fixed large" variance for a model without learned sigmas: β_t, with β̃_1 at t = 0 (β̃_1 = 0.2·0.1/0.28)."""
    from speedpipe.diffusion.gaussian import GaussianDiffusion

    d = GaussianDiffusion(np.array([0.1, 0.2, 0.5]), learn_sigma=False)
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    _, log_var, _, _ = d.p_mean_variance_from_output(torch.zeros_like(x), x, torch.tensor([0, 1, 2]))
    assert log_var.flatten().numpy() == pytest.approx(np.log([0.2 * 0.1 / 0.28, 0.2, 0.5]), rel=1e-6)
    assert d.training_losses(torch.ones_like(x), x, x, torch.tensor([0, 1, 2]), x)["vb"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_classifier_free_guidance_by_hand(guided_channels):
    """ε = ε_u + s·(ε_c − ε_u) on the guided channels (all, or DiT's first 3 of 4), ε_c elsewhere; the variance
    channels are the conditional model's."""
    from speedpipe.diffusion.gaussian import cfg_model_fn

    def model(x, t, y):  # [ε | v] of 4 + 4 channels: 1 + y per channel for a label, 0.25 for the null class 9
        value = (1.0 + y.double()).masked_fill(y == 9, 0.25).view(-1, 1, 1, 1)
        return torch.cat([value * torch.arange(1, 5, dtype=torch.float64).view(1, 4, 1, 1), 7 + value.expand(-1, 4, 1, 1)], 1)

    x, y = torch.zeros(2, 4, 1, 1, dtype=torch.float64), torch.tensor([0, 2])
    out = cfg_model_fn(model, y, 3.0, null_class=9, guided_channels=guided_channels)(x, torch.zeros(2, dtype=torch.long))
    k = torch.arange(1, 5, dtype=torch.float64)
    for i, label in enumerate((0, 2)):
        cond, uncond = (1 + label) * k, 0.25 * k
        guided = uncond + 3.0 * (cond - uncond)
        expected = guided if guided_channels is None else torch.cat([guided[:3], cond[3:]])
        assert torch.allclose(out[i, :4, 0, 0], expected) and torch.allclose(out[i, 4:, 0, 0], torch.full((4,), 8.0 + label, dtype=torch.float64))


def test_an_unweighted_loss_is_mse_plus_vb(three_steps):
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    out = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    terms = three_steps.training_losses(out, x, x, torch.tensor([0, 1, 2]), x)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
