"""Stage `distill`: a trained DiT diffusion model into a 1-2 step TrigFlow-native consistency model, by the
consistency method distill.method (speedpipe.consistency.methods: scd distils the teacher, sct trains on the data).

The student is the diffusion model's DiT (initialised from its EMA weights) read as a TrigFlow model: its first C
output channels are F_θ and its time input is c_noise(t) = distill.time_scale·t. Steps 1..W
(distill.warm_start_steps) warm-start it with the TrigFlow diffusion loss, so that the method starts from a
diffusion model in the student's own parameterisation (the same warm start for every method); steps W+1..W+S
(distill.steps) are the method's objective. Checkpoints are numbered by that global step: ckpt-{W} is the
warm-started student, the same for every method.

Without a teacher (distill.teacher null; a method that evaluates no teacher network, such as sct or meanflow) the
student is the run's own DiT (model.*, from model.init_from or initialised), the warm start regresses on the data
(distill.warm_start_target: data; W = 0 trains the method from that network as it is) and the latents are normalised
per data.latent_norm.

Reads the teacher checkpoint and the latent store; writes {run_dir}/ckpt-{step:07d}.pt (student, student EMA,
logvar head, optimizer, RNG, data order, the teacher's config and latent normalisation), log.csv and
config.yaml. Resumable and bit-identical on CPU, DDP over the global batch like the train stage.
"""
import copy

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from speedpipe.checkpoint import load_checkpoint
from speedpipe.config import save_config, to_plain
from speedpipe.errors import ConfigError
from speedpipe.consistency.methods import consistency_method
from speedpipe.consistency.objectives import LogvarHead, TimeProposal, TrigFlowDiffusionLoss
from speedpipe.consistency.trigflow import TrigFlowStudent, TrigFlowTeacher
from speedpipe.data.latents import LatentNormalization, open_training_data
from speedpipe.data.order import EpochBatches, rank_slice
from speedpipe.diffusion import create_diffusion
from speedpipe.distributed import setup_device, shutdown
from speedpipe.io import state_fingerprint
from speedpipe.layout import distill_run_dir
from speedpipe.loop import Cadence, ResumableLoop
from speedpipe.models.dit import build_model
from speedpipe.stages import STAGES
from speedpipe.randomness import stream_seed
from speedpipe.training import StepRandomness, update_ema

LOG_COLUMNS = ["step", "objective", "loss", "mse", "tangent_norm", "logvar", "skipped", "steps_per_s"]


def total_steps(d) -> int:
    return d.warm_start_steps + d.steps


class _StudentWithHead(torch.nn.Module):
    """Everything that is trained, with the objective as its forward, so DDP all-reduces every gradient."""

    def __init__(self, student, logvar_head):
        super().__init__()
        self.student, self.logvar_head = student, logvar_head

    def forward(self, objective, student, x0, z, t, y, step):
        return objective(student, self.logvar_head, x0, z, t, y, step)


class PhasedTimes:
    """The training times: the TrigFlow proposal for the warm start's steps 1..W, the method's own after."""

    def __init__(self, warm_start, method, warm_start_steps: int):
        self.warm_start, self.method, self.warm_start_steps = warm_start, method, warm_start_steps

    def sample(self, n, generator=None, step=None):
        return (self.warm_start if step <= self.warm_start_steps else self.method).sample(n, generator, step)


def refuse_without_teacher(d, method):
    """A run without a teacher (distill.teacher null) trains from the run's own DiT: its method must evaluate no teacher
    network and its warm start must regress on the data."""
    if method.teacher_velocity:
        raise ConfigError(f"config key 'distill.teacher': required by distill.method {d.method} (its objective evaluates "
                          f"the teacher network; a ckpt-*.pt of a train run)")
    if d.warm_start_target != "data":
        raise ConfigError(f"config key 'distill.warm_start_target': {d.warm_start_target!r} needs a teacher, and "
                          f"distill.teacher is null: set it to 'data'")


@STAGES["distill"].entry
def run(cfg, provenance):
    d = cfg.distill
    method = consistency_method(d.method)
    if not d.teacher:
        refuse_without_teacher(d, method)
    device, env = setup_device(d.device, "distill.device")
    if d.global_batch_size % env.world_size:
        raise ConfigError(f"config key 'distill.global_batch_size': {d.global_batch_size} is not divisible by {env.world_size} ranks")
    run_dir = distill_run_dir(cfg)
    torch.manual_seed(stream_seed(cfg.seed, "init"))  # the same on every rank: results do not depend on the world size

    if d.teacher:
        teacher_state = load_checkpoint(d.teacher)
        net_cfg = OmegaConf.create(teacher_state["config"])
        net = build_model(net_cfg, initialise=False)
        net.load_state_dict(teacher_state["ema"])
        net = net.to(device).eval()
        diffusion = create_diffusion(noise_schedule=net_cfg.diffusion.noise_schedule,
                                     diffusion_steps=net_cfg.diffusion.diffusion_steps)
        teacher = TrigFlowTeacher.over_latents(copy.deepcopy(net).requires_grad_(False), diffusion.alphas_cumprod,
                                               d.sigma_d, d.cfg_scale)
        normalization = LatentNormalization.from_state(teacher_state.get("latent_norm"), net_cfg.model.in_channels)
    else:  # the run's own DiT (model.init_from's weights, or initialised), its latents normalised per data.latent_norm
        teacher_state, net_cfg, teacher, normalization = None, cfg, None, None
        net = build_model(cfg).to(device).eval()  # eval: labels are dropped by the method's stream, not the DiT
    trigflow = TrigFlowStudent(net.requires_grad_(True), d.sigma_d, d.time_scale)  # the warm start's student
    trigflow.net.pos_embed.requires_grad_(False)
    student = method.make_student(trigflow)  # the method's, on the same network (MeanFlow adds its interval embedding)
    label_dropout = method.dropped_labels(d)
    if label_dropout and net.y_embedder.embedding_table.num_embeddings == net.num_classes:
        raise ConfigError(f"config key 'distill.method': {d.method} drops labels ({label_dropout}) to a null class the "
                          f"network of {d.teacher or 'this run (model.class_dropout_prob)'} has none of (it needs "
                          f"model.class_dropout_prob > 0)")
    trained = _StudentWithHead(student, LogvarHead()).to(device)
    ema = copy.deepcopy(student.net).requires_grad_(False)
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=d.lr, betas=tuple(d.betas))
    warm_start = TrigFlowDiffusionLoss(teacher, d.warm_start_target, d.precision)
    consistency = method.objective(teacher, d)

    dataset = open_training_data(cfg, net_cfg.model, normalization)
    order = EpochBatches(len(dataset), d.global_batch_size, cfg.seed, key="distill.global_batch_size")
    # the training streams with the time proposals for timesteps, the method's label dropout, z ~ N(0, I) (scaled by
    # σ_d) as noise
    times = PhasedTimes(TimeProposal(d.sigma_d, d.p_mean, d.p_std), method.make_times(d), d.warm_start_steps)
    randomness = StepRandomness(cfg.seed, times, dataset.latent_shape, label_dropout, cfg.data.random_flip,
                                dataset.samples_posterior, "cpu")
    # what a checkpoint records to rebuild its student: the network's config (the teacher's; without a teacher, the
    # run's own) and the latents' normalisation
    network_config = teacher_state["config"] if teacher_state else to_plain(provenance)
    latent_norm = teacher_state.get("latent_norm") if teacher_state else dataset.normalization.state_dict()
    # what a resumed run must share with the run it resumes: the settings, the data, and the teacher's content
    settings = {**STAGES["distill"].run_settings(provenance), "data": dataset.identity(),
                "teacher": teacher_state and state_fingerprint({k: teacher_state.get(k) for k in ("ema", "config", "latent_norm")})}
    loop = ResumableLoop(run_dir, Cadence(total_steps(d), d.log_every, d.ckpt_every, (d.warm_start_steps, *d.ckpt_steps),
                                          d.resume_every_steps, d.resume_every_minutes),
                         {"model": student.net, "logvar_head": trained.logvar_head, "ema": ema, "opt": opt, "data_order": order},
                         randomness.generators, env, LOG_COLUMNS, what="distill", progress=d.progress, settings=settings,
                         nonfinite="skip" if d.skip_nonfinite else "stop",
                         checkpoint_extra=lambda: {"config": to_plain(provenance), "teacher_config": network_config,
                                                   "latent_norm": latent_norm},
                         log_fields=lambda step, mean, steps_per_s: {
                             "objective": "warm_start" if step <= d.warm_start_steps else method.name})
    loop.resume()
    if env.is_main:
        save_config(provenance, loop.state_dir / "config.yaml")
    # a student other than the TrigFlow one leaves the logvar head (and, in the warm start, its own parameters) unused
    net_ddp = DDP(trained, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=student is not trigflow) if env.world_size > 1 else trained
    model_params, ema_params = list(student.net.parameters()), list(ema.parameters())
    mine = lambda v: None if v is None else rank_slice(v, env.rank, env.world_size)  # noqa: E731

    def forward(step):
        n = d.global_batch_size
        idx = order.next_global_batch()
        t, drop, flip, eps, noise = randomness.draw(n, step)
        z = d.sigma_d * noise
        latents, y = dataset.get_batch(mine(idx), mine(flip), mine(eps))
        x0 = d.sigma_d * latents  # TrigFlow data: unit-variance latents scaled to std σ_d
        if step <= d.warm_start_steps:
            objective, model, k = warm_start, trigflow, step
        else:
            objective, model, k = consistency, student, step - d.warm_start_steps
            y = torch.where(mine(drop), net.num_classes, y)
        terms = net_ddp(objective, model, x0.to(device), mine(z).to(device), mine(t).to(device), y.to(device), k)
        if "g" in terms:
            terms["tangent g"] = terms.pop("g")
        return terms

    def update(terms):
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        update_ema(ema_params, model_params, d.ema_decay)

    loop.run(forward, update)
    shutdown(env)
    return run_dir
