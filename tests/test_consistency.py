import csv
import math

import numpy as np
import pytest
import torch

from conftest import events
from speedpipe.checkpoint import load_checkpoint
from speedpipe.config import load_config
from speedpipe.consistency.methods.scd import SCDLoss
from speedpipe.consistency.objectives import LogvarHead, graded_F_and_tangent
from speedpipe.consistency.sampling import ConsistencySampler
from speedpipe.consistency.trigflow import ContinuousIndex, TrigFlowStudent, TrigFlowTeacher
from speedpipe.diffusion import create_diffusion
from speedpipe.models.dit import DiT_models
from speedpipe.models.dit_tangent import forward_with_tangent
from speedpipe.stages import distill, train


class OptimalGaussianEps(torch.nn.Module):
    """E[ε | x_n] for data x0 ~ N(μ, s² I) at a (continuous) DDPM index n: the optimal ε-predictor."""

    def __init__(self, index: ContinuousIndex, mu, s):
        super().__init__()
        self.index, self.mu, self.s = index, mu, s
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.num_classes = 1

    def forward(self, x_n, n, y):
        ab = torch.exp(self.index.log_alpha_bar(n)).view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_n - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # learned-sigma layout: [ε̂ | v]


@pytest.mark.parametrize("sigma_d,latent_scale", [(0.5, 1.0), (1.0, 1.0), (0.5, 0.5), (0.5, 0.8)])
def test_converted_teacher_is_the_optimal_trigflow_velocity(sigma_d, latent_scale):
    diffusion = create_diffusion("")
    mu_latent, s_latent = 0.3, 0.8
    net = OptimalGaussianEps(ContinuousIndex(diffusion.alphas_cumprod), mu_latent, s_latent)
    teacher = TrigFlowTeacher(net, diffusion.alphas_cumprod, sigma_d=sigma_d, latent_scale=latent_scale)
    mu, s = latent_scale * mu_latent, latent_scale * s_latent  # the TrigFlow data x0 = L·latent
    t = torch.tensor([0.05, 0.4, 0.9, 1.3, 1.55], dtype=torch.float64)
    x_t = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    F = teacher(x_t / sigma_d, t, torch.zeros(5, dtype=torch.long))
    c, sn = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    var = c**2 * s**2 + sn**2 * sigma_d**2  # x_t = cos t·x0 + sin t·z, z ~ N(0, σ_d²)
    e_x0 = mu + c * s**2 / var * (x_t - c * mu)
    e_z = sn * sigma_d**2 / var * (x_t - c * mu)
    F_opt = (c * e_z - sn * e_x0) / sigma_d
    assert torch.allclose(F, F_opt, rtol=0, atol=1e-8)


def test_continuous_index_inverts_the_alpha_table():
    diffusion = create_diffusion("")
    index = ContinuousIndex(diffusion.alphas_cumprod)
    n = torch.tensor([0.0, 0.25, 7.5, 641.9, 999.0], dtype=torch.float64)
    assert torch.allclose(index.index(index.log_alpha_bar(n)), n, atol=1e-9)
    ints = torch.arange(0, 1000, 37)
    assert torch.allclose(index.log_alpha_bar(ints.double()), torch.log(torch.from_numpy(diffusion.alphas_cumprod))[ints])


def _tiny_dit(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = DiT_models["DiT-T/2"](input_size=8, num_classes=10)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)
    return net.to(dtype).eval()


def _tiny_student(dtype=torch.float64):
    return TrigFlowStudent(_tiny_dit(dtype), sigma_d=0.5, time_scale=1.0)


def _tiny_teacher(dtype=torch.float64):
    return TrigFlowTeacher.over_latents(_tiny_dit(dtype, seed=1).requires_grad_(False), create_diffusion("").alphas_cumprod, 0.5)


def test_student_time_input_is_time_scale_times_t():
    """c_noise(t) = time_scale·t reaches the DiT's timestep embedder: F changes with t, and time_scale 2 at t equals
    time_scale 1 at 2t."""
    net = _tiny_dit()
    x, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 7])
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    one, two = TrigFlowStudent(net, sigma_d=0.5, time_scale=1.0), TrigFlowStudent(net, sigma_d=0.5, time_scale=2.0)
    assert torch.equal(two.c_noise(t), 2 * t)
    assert torch.allclose(two(x, t, y), one(x, 2 * t, y)) and not torch.allclose(one(x, t, y), one(x, 2 * t, y))


@pytest.mark.parametrize("step", [1, 5, 20])
def test_scd_tangent_against_its_formula(step):
    """With F ≡ 0 (a DiT at its adaLN-zero initialisation) and a linear teacher velocity v(x/σ_d) = 0.3 x/σ_d + 0.1,
    the sCD tangent is g = cos²t · σ_d v - r cos t sin t · x_t with r = min(1, step/H), normalised to g/(‖g‖ + c)."""
    torch.manual_seed(0)
    student = TrigFlowStudent(DiT_models["DiT-T/2"](input_size=8, num_classes=10).double().eval(), sigma_d=0.5)
    loss = SCDLoss(lambda x, t, y: 0.3 * x + 0.1, tangent_warmup=10, tangent_c=0.1)
    g = torch.Generator().manual_seed(3)
    x0, z = 0.5 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), 0.5 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64), torch.tensor([1, 5, 9])
    terms = loss(student, LogvarHead().double(), x0, z, t, y, step)
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    assert torch.equal(student(x_t / 0.5, t, y), torch.zeros_like(x_t))
    cos, sin, r = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1), min(1.0, step / 10)
    raw = cos**2 * 0.5 * (0.3 * x_t / 0.5 + 0.1) - r * cos * sin * x_t
    norm = raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(terms["g"], raw / (norm + 0.1), atol=1e-6)  # the teacher is evaluated in fp32


def test_jvp_tangent_matches_finite_differences():
    student = _tiny_student()
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), 0.5 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 5, 9])
    t = torch.tensor([0.3, 0.8, 1.2], dtype=torch.float64)
    path = lambda tt: torch.cos(tt).view(-1, 1, 1, 1) * x0 + torch.sin(tt).view(-1, 1, 1, 1) * z  # noqa: E731
    dx_dt = -torch.sin(t).view(-1, 1, 1, 1) * x0 + torch.cos(t).view(-1, 1, 1, 1) * z
    _, cos_sin_dF = graded_F_and_tangent(student, path(t), t, y, dx_dt)
    h = 1e-6
    with torch.no_grad():
        fd = (student(path(t + h) / 0.5, t + h, y) - student(path(t - h) / 0.5, t - h, y)) / (2 * h)
    expected = (torch.cos(t) * torch.sin(t)).view(-1, 1, 1, 1) * fd
    rel = (cos_sin_dF - expected).norm() / expected.norm()
    assert rel < 1e-6, rel


@pytest.mark.parametrize("fused_attn", [True, False])
def test_the_dits_own_tangent_is_its_forward_mode_derivative(fused_attn):
    """forward_with_tangent (speedpipe.models.dit_tangent): its value is the DiT's forward, bit for bit, and carries gradients; its tangent is
    torch.func.jvp's through the math attention kernel (fp64), along the image and the time input at once."""
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = _tiny_dit()
    net.set_fused_attn(fused_attn)
    g = torch.Generator().manual_seed(4)
    x, dx = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, dt = 3 * torch.rand(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 5, 9])
    out, d_out = forward_with_tangent(net, x, dx, t, dt, y)
    assert torch.equal(out, net(x, t, y)) and out.requires_grad and not d_out.requires_grad
    with sdpa_kernel(SDPBackend.MATH):
        _, expected = jvp(lambda a, b: net(a, b, y), (x, t), (dx, dt))
    assert (d_out - expected).abs().max() < 1e-12 * expected.abs().max()
    _, along_x = forward_with_tangent(net, x, dx, t, torch.zeros_like(dt), y)
    assert (along_x - expected).abs().max() > 1e-3 * expected.abs().max()  # the time direction is part of it


def test_the_dits_own_tangent_under_bf16_autocast_is_as_close_as_torch_func_jvps():
    """Under bf16 autocast (distill.precision=bf16) the value is still the DiT's forward bit for bit, and the tangent is
    within 1 % of the fp32 derivative, at most 1.5x the error of torch.func.jvp under the same autocast (measured: 0.52 %
    and 0.52 %, the tangent's residual stream in fp32 as the primal's; 0.93 % with it in bf16)."""
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = _tiny_dit(torch.float32)
    g = torch.Generator().manual_seed(4)
    x, dx = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(2))
    t, dt, y = torch.rand(4, generator=g), torch.randn(4, generator=g), torch.tensor([0, 1, 2, 3])
    along = lambda: jvp(lambda a, b: net(a, b, y), (x, t), (dx, dt))[1].float()  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        exact = along()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = along()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, own = forward_with_tangent(net, x, dx, t, dt, y)
        assert torch.equal(out, net(x, t, y))
    error = lambda d: ((d.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(own) < min(0.01, 1.5 * error(reference)), (error(own), error(reference))


@pytest.mark.parametrize("dtype,tolerance,time_scale", [(torch.float64, 1e-10, 1.0), (torch.float64, 1e-10, 2.5),
                                                        (torch.float32, 1e-4, 1.0)])
def test_an_scd_step_with_the_dits_own_tangent_equals_the_step_with_torch_func_jvp(dtype, tolerance, time_scale):
    """One sCD step (guided teacher, tangent warmed up halfway): loss and every parameter gradient with the DiT's own
    tangent in its graded pass equal those of a graded pass plus torch.func.jvp through the math kernel (the
    reference, which differentiates the student's time input c_noise = time_scale·t itself), within `tolerance`
    relative (fp32: the kernels' rounding)."""
    g = torch.Generator().manual_seed(6)
    x0, z = (0.5 * torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, y = torch.tensor([0.1, 0.6, 1.1, 1.5], dtype=torch.float64), torch.tensor([0, 3, 7, 9])
    teacher = TrigFlowTeacher.over_latents(_tiny_dit(dtype, seed=1).requires_grad_(False), create_diffusion("").alphas_cumprod,
                                           0.5, cfg_scale=2.0)
    results = []
    for own_tangent in (True, False):
        student = TrigFlowStudent(_tiny_dit(dtype), 0.5, time_scale=time_scale, own_tangent=own_tangent)
        head = LogvarHead().to(dtype)
        loss = SCDLoss(teacher, tangent_warmup=2)(student, head, x0, z, t, y, step=1)["loss"]
        loss.backward()
        results.append((loss.item(), {k: p.grad for k, p in student.net.named_parameters() if p.grad is not None}))
    (own_loss, own_grads), (ref_loss, ref_grads) = results
    assert abs(own_loss - ref_loss) <= tolerance * abs(ref_loss)
    assert own_grads.keys() == ref_grads.keys() and len(ref_grads) > 40
    total = torch.sqrt(sum((g**2).sum() for g in ref_grads.values()))
    difference = torch.sqrt(sum(((own_grads[k] - ref_grads[k]) ** 2).sum() for k in ref_grads))
    assert difference <= tolerance * total, (difference / total).item()


def test_boundary_condition():
    student = _tiny_student()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1])
    for t0, tol in ((1e-3, 1e-2), (1e-7, 1e-5)):
        f = student.consistency(x, torch.full((2,), t0, dtype=torch.float64), y)
        assert (f - x).abs().max() < tol


@pytest.fixture
def toy_teacher(tiny_train_config):
    return train.run(load_config(tiny_train_config, ["trainer.steps=4"], phase="train")) / "ckpt-0000004.pt"


def _distill_cfg(tiny_train_config, teacher, run_dir, *extra):
    return load_config(tiny_train_config, [f"distill.teacher={teacher}", f"distill.run_dir={run_dir}", "distill.steps=20",
                                           "distill.warm_start_steps=4",
                                           "distill.global_batch_size=8", "distill.log_every=4", "distill.ckpt_every=8",
                                           "distill.tangent_warmup=8", "distill.lr=1e-3", "distill.ema_decay=0.9",
                                           "distill.device=cpu", "distill.progress=false", *extra], phase="train")


def _log(run_dir):
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def test_distill_reduces_loss_and_resumes_bit_identical(tiny_train_config, toy_teacher, tmp_path):
    straight = distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / "a"))
    rows = _log(straight)
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / "b", "distill.steps=8"))
    resumed = distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / "b"))
    assert [(e["event"], e["step"], e["source"], e["steps_performed"]) for e in events(resumed)] == [
        ("start", 0, "", ""), ("finished", 12, "", "12"), ("resume", 12, "ckpt-0000012.pt", ""), ("finished", 24, "", "12")]
    a, b = load_checkpoint(straight / "ckpt-0000024.pt"), load_checkpoint(resumed / "ckpt-0000024.pt")
    for key in ("model", "ema", "logvar_head"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [r["loss"] for r in _log(straight)] == [r["loss"] for r in _log(resumed)]


def test_every_method_starts_from_the_same_warm_start_and_differs_only_after_it(tiny_train_config, toy_teacher, tmp_path):
    """sCD and sCT from one teacher: the warm-started checkpoint is bit-identical (same diffusion weights, same warm
    start, same random stream), the first checkpoint after it is not (they follow different velocities), and each log
    names its method for the steps after the warm start."""
    runs = {m: distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / m, "distill.steps=4", f"distill.method={m}"))
            for m in ("scd", "sct")}
    warm = [load_checkpoint(runs[m] / "ckpt-0000004.pt") for m in runs]
    after = [load_checkpoint(runs[m] / "ckpt-0000008.pt") for m in runs]
    assert all(torch.equal(warm[0][k][n], warm[1][k][n]) for k in ("model", "ema", "logvar_head") for n in warm[0][k])
    assert not all(torch.equal(after[0]["model"][n], after[1]["model"][n]) for n in after[0]["model"])
    for m, run_dir in runs.items():
        assert {r["objective"] for r in _log(run_dir)} == {"warm_start", m}


@pytest.mark.parametrize("warm_start,quantity", [(0, "tangent g"), (4, "distill loss")])
def test_nonfinite_tangent_is_caught(tiny_train_config, toy_teacher, tmp_path, poison_third_batch, warm_start, quantity):
    """A NaN batch in sCD (the tangent) or in the warm start (the loss) stops the run, or is skipped and counted."""
    no_warm_start = f"distill.warm_start_steps={warm_start}", f"distill.steps={24 - warm_start}"
    with pytest.raises(FloatingPointError, match=f"non-finite [^;]*{quantity}[^;]* at step 3"):
        distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / "nan", *no_warm_start))
    poison_third_batch()
    run_dir = distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / "skip", "distill.skip_nonfinite=true", *no_warm_start))
    assert _log(run_dir)[-1]["skipped"] == "1"
    state = load_checkpoint(run_dir / "ckpt-0000024.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _sampled(tiny_train_config, checkpoint, sampler, out, n=6):
    """The sample stage on a student checkpoint, decoding with a tiny autoencoder: the images and their record."""
    import json

    from diffusers import AutoencoderKL

    from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
    from speedpipe.stages import sample

    vae = out.parent / "vae.safetensors"
    if not vae.exists():
        save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)), 0.7, vae)
    path = sample.run(load_config(tiny_train_config, [f"sampling.checkpoint={checkpoint}", f"sampling.sampler={sampler}",
                                                      "autoencoder.name=tiny", f"autoencoder.path={vae}", f"sampling.num_samples={n}",
                                                      f"sampling.out={out}", "sampling.progress=false"], phase="sample"))
    return np.load(path)["arr_0"], json.loads(path.with_suffix(".json").read_text())


def test_scm_samplers_plug_into_the_sample_stage(tiny_train_config, toy_teacher, tmp_path):
    run_dir = distill.run(_distill_cfg(tiny_train_config, toy_teacher, tmp_path / "d", "distill.steps=2"))  # 4 warm + 2
    for sampler, nfe in (("scm1", 1), ("scm2", 2)):
        images, record = _sampled(tiny_train_config, run_dir / "ckpt-0000006.pt", sampler, tmp_path / f"{sampler}.npz")
        assert images.shape == (6, 16, 16, 3) and record["nfe_per_image"] == nfe


def test_consistency_sampler_steps_from_t_max_and_t_mid():
    """scm1 = f(σ_d z, arctan(80/σ_d)); scm2 re-noises that to t_mid = 1.1 and applies f once more (÷ σ_d: latents)."""
    student = _tiny_student()
    y = torch.tensor([0, 3, 7])
    one, two = ConsistencySampler(student, (4, 8, 8), 1), ConsistencySampler(student, (4, 8, 8), 2)
    assert one.t_max == two.t_max == pytest.approx(1.5645464, abs=1e-6) and two.mid_t == 1.1
    g = torch.Generator().manual_seed(5)
    z, z2 = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        x0 = student.consistency(0.5 * z.double(), torch.full((3,), math.atan(80 / 0.5), dtype=torch.float64), y)
        x_mid = math.cos(1.1) * x0 + math.sin(1.1) * 0.5 * z2.double()
        x0_2 = student.consistency(x_mid, torch.full((3,), 1.1, dtype=torch.float64), y)
    torch.testing.assert_close(one(y, torch.Generator().manual_seed(5)).double(), x0 / 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two(y, torch.Generator().manual_seed(5)).double(), x0_2 / 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0.4, 1.1, 1.5])
def test_scd_gradient_moves_f_toward_its_value_one_ode_step_earlier(t):
    """sCD's gradient is, up to a positive factor, that of ‖f_θ(x_t, t) − sg[f_θ(x_{t−h}, t−h)]‖² along the teacher's
    ODE: a small step against it shrinks that gap and a step along it grows it (a sign error in g fails)."""
    teacher, student = _tiny_teacher(), _tiny_student().requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    x0, z = (0.5 * torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y, t = torch.tensor([3]), torch.full((1,), t, dtype=torch.float64)
    x_t = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    h = 1e-4
    with torch.no_grad():
        dx_dt = 0.5 * teacher(x_t / 0.5, t, y)
        earlier = student.consistency(x_t - h * dx_dt, t - h, y)

    def gap(eta):
        params = [p for p in student.net.parameters() if p.grad is not None]
        with torch.no_grad():
            for p in params:
                p -= eta * p.grad
            value = (student.consistency(x_t, t, y) - earlier).norm().item()
            for p in params:
                p += eta * p.grad
        return value

    SCDLoss(teacher, tangent_warmup=1)(student, LogvarHead().double(), x0, z, t, y, step=1)["loss"].backward()
    assert gap(1e-6) < gap(0.0) < gap(-1e-6)


def _no_teacher_cfg(tiny_train_config, run_dir, *extra):
    return load_config(tiny_train_config, [f"distill.run_dir={run_dir}", "distill.warm_start_target=data",
                                           "distill.warm_start_steps=2", "distill.steps=2", "distill.global_batch_size=8",
                                           "distill.log_every=1", "distill.ckpt_every=2", "distill.device=cpu",
                                           "distill.progress=false", *extra], phase="train")


@pytest.mark.parametrize("method", ["meanflow", "sct"])
def test_a_method_that_evaluates_no_teacher_trains_without_one(tiny_train_config, tmp_path, method):
    """distill.teacher null: the student is the run's own DiT (model.*), warm-started on the data, then the method; the
    checkpoint carries that network's config, so the sample stage rebuilds the student (MeanFlow's with its interval
    embedding) and samples it in one step. A run stopped after its warm start and continued ends bit-identical."""
    from speedpipe.data.latents import open_training_data

    cfg = _no_teacher_cfg(tiny_train_config, tmp_path / method, f"distill.method={method}", "data.latent_norm=channel")
    run_dir = distill.run(cfg)
    state = load_checkpoint(run_dir / "ckpt-0000004.pt")
    distill.run(_no_teacher_cfg(tiny_train_config, tmp_path / "resumed", f"distill.method={method}", "data.latent_norm=channel",
                                "distill.steps=1"))  # one step of the method, then the same run continued
    resumed = load_checkpoint(distill.run(_no_teacher_cfg(tiny_train_config, tmp_path / "resumed", f"distill.method={method}",
                                                          "data.latent_norm=channel")) / "ckpt-0000004.pt")
    assert [e["event"] for e in events(tmp_path / "resumed")][-2:] == ["resume", "finished"]
    assert all(torch.equal(state[k][n], resumed[k][n]) for k in ("model", "ema") for n in state[k])
    assert state["teacher_config"]["model"] == dict(cfg.model) and state["config"]["distill"]["teacher"] is None
    assert state["latent_norm"] == open_training_data(cfg).normalization.state_dict()  # the data's statistics, per data.latent_norm
    assert ("interval_embedder.mlp.0.weight" in state["model"]) == (method == "meanflow")
    assert {r["objective"] for r in _log(run_dir)} == {"warm_start", method}
    images, record = _sampled(tiny_train_config, run_dir / "ckpt-0000004.pt", "scm1", tmp_path / "one.npz", n=4)
    assert images.shape == (4, 16, 16, 3) and record["nfe_per_image"] == 1


@pytest.mark.parametrize("setting,message", [
    (("distill.method=scd",), "'distill.teacher': required by distill.method scd"),
    (("distill.method=sct", "distill.warm_start_target=teacher"), "'distill.warm_start_target': 'teacher' needs a teacher"),
    (("distill.method=meanflow", "distill.meanflow.label_dropout=0.1", "model.class_dropout_prob=0"), "has none of"),
    (("distill.method=meanflow", "distill.meanflow.omega=2.0"), "'distill.meanflow.label_dropout': 0, but guidance")])
def test_a_run_without_a_teacher_is_refused_what_needs_one(tiny_train_config, tmp_path, setting, message):
    from speedpipe.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        distill.run(_no_teacher_cfg(tiny_train_config, tmp_path / "refused", *setting))
    assert not (tmp_path / "refused").exists()
