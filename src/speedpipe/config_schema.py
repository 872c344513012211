"""Every setting a stage config may hold, as dataclasses with their defaults (one section per stage or concern), and
the valid values beyond their types: CHOICES (the options of a choice), POSITIVE and RANGES (speedpipe.config checks
them when it loads a config)."""
import math
import re
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, List, NamedTuple, Optional

from speedpipe.declared import STAGES as STAGE_MODULES
from speedpipe.declared import method_settings, settings_of, source_settings, stage_declarations, timestep_parameters

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # experiment, method and table names: they become folder and file names
NAME_RULE = "names are letters, digits, '_', '.' and '-' (they become folder and file names), starting with a letter or digit"


def _timestep_section(class_name: str, default: str, registry: str, doc: str):
    """A timestep sampler's or loss weighting's section: its name, and every parameter a method declares
    (speedpipe.declared), unset (None) by default: the method's own default applies."""
    params = [(key, Optional[kind] if kind else Any, None) for key, kind in timestep_parameters(registry).items()]
    return make_dataclass(class_name, [("name", str, default), *params], namespace={"__doc__": doc, "__module__": __name__})


SamplerConfig = _timestep_section("SamplerConfig", "uniform", "SAMPLERS", "Timestep sampler: uniform | speed (k, tau, dual) | "
                                "lognormal (p_mean, p_std) | logit_normal (m, s) | clts (mu, sigma, ramp_steps) | a module's "
                                "of speedpipe.diffusion.timestep_methods. Unset = the method's default.")
WeightingConfig = _timestep_section("WeightingConfig", "none", "WEIGHTINGS", "Per-timestep MSE weight: none | speed (lam, tau) | "
                                  "p2 (k, gamma) | min_snr (gamma) | sigmoid (b) | a module's of "
                                  "speedpipe.diffusion.timestep_methods.")


def _declared_type(value):
    """A setting's type from its default: bool, int, float, str, a list of one of them, or any."""
    kinds = [bool, int, float, str]
    if isinstance(value, list):
        kind = next((k for k in kinds if value and all(type(v) is k for v in value)), Any)
        return List[kind]
    return next((k for k in kinds if type(value) is k), Any)


def with_declared_sections(base: type, name: str, declared: dict[str, dict]) -> type:
    """The dataclass `base` with a section per plug-in that declares settings (SETTINGS in its module, read by
    speedpipe.declared): {plug-in: {key: default}} -> a field `plug-in` of those keys, typed by their defaults."""
    taken = sorted(set(declared) & {f.name for f in fields(base)})
    if taken:
        raise TypeError(f"{name}: the settings section of {taken} would replace the key of that name")
    sections = []
    for plugin, defaults in declared.items():
        keys = [(key, _declared_type(value), field(default_factory=lambda v=value: list(v)) if isinstance(value, list) else value)
                for key, value in defaults.items()]
        section = make_dataclass(f"{plugin}_settings", keys, namespace={"__module__": __name__})
        sections.append((plugin, section, field(default_factory=section)))
    return make_dataclass(name, sections, bases=(base,), namespace={"__module__": __name__, "__doc__": base.__doc__})


@dataclass
class DiffusionConfig:
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True
    timestep_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss_weighting: WeightingConfig = field(default_factory=WeightingConfig)


@dataclass
class ModelConfig:
    name: str = "DiT-XL/2"  # a key of speedpipe.models.dit.DiT_models
    input_size: int = 32  # latent height/width
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    fused_attn: bool = True  # F.scaled_dot_product_attention; false = explicit softmax(QK^T)V
    init_from: Optional[str] = None  # official DiT checkpoint (bare state_dict or under "ema") to start from


@dataclass
class DataSettings:
    """Images (for the autoencoder, encode and reference stages) and the latent source training reads."""

    name: str = "mnist5k"  # mnist5k | image_folder | a module of speedpipe.data.sources
    root: Optional[str] = None  # image_folder: root/<class_name>/*.{JPEG,jpg,png,webp}, or a flat folder
    image_size: int = 32
    mnist_fit: str = "pad"  # mnist5k 28x28 -> image_size: pad (centred) | resize (bicubic)
    strict: bool = False  # an unreadable image stops the run instead of being skipped and counted
    source: str = "latents"  # what training reads: latents (the encode stage's store) | synthetic (tests)
    latents_dir: Optional[str] = None  # default: {output_dir}/{experiment}/latents
    random_flip: bool = True  # use the stored latent of the horizontally flipped image half the time
    latent_norm: str = "none"  # none (DiT: the scaled latents as they are) | channel (per-channel zero mean, unit std)
    synthetic_size: int = 512  # number of synthetic examples (source: synthetic)


DataConfig = with_declared_sections(DataSettings, "DataConfig", {s: d for s, d in source_settings().items() if d})  # data.{source}.*


@dataclass
class AutoencoderConfig:
    """tiny: trained by the pipeline; sd-vae-ft-ema / sd-vae-ft-mse: pretrained diffusers AutoencoderKL."""

    name: str = "sd-vae-ft-ema"  # tiny | sd-vae-ft-ema | sd-vae-ft-mse
    path: Optional[str] = None  # local directory or hub id; default: the pipeline's own (tiny) or stabilityai/<name>
    allow_download: bool = False  # let diffusers fetch missing weights from the hub (never in tests or the demo)
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64, 64])  # tiny: 2^(len-1) downsampling
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1.0e-3
    kl_weight: float = 1.0e-6
    log_every: int = 50
    ckpt_every: int = 500
    resume_every_steps: int = 0  # resume checkpoint latest.pt every N steps (0: off) ...
    resume_every_minutes: float = 30.0  # ... and every N minutes (0: off); also saved on SLURM's pre-timeout signal
    progress: bool = True


@dataclass
class EncodeConfig:
    mode: str = "flip"  # flip: one posterior sample of the image and of its mirror | posterior: mean and std of both
    shard_size: int = 1024
    dtype: str = "fp16"  # fp16 | fp32
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast of the encoder)
    progress: bool = True


@dataclass
class SamplingConfig:
    """The sample stage (config section `sampling`; the `sample:` phase sub-dict can override it)."""

    checkpoint: Optional[str] = None  # ckpt-*.pt of a train (or distill) run
    sampler: str = "ddpm250"  # ddpm<N> | ddim<N> | scm1 | scm2
    ddim_eta: float = 0.0
    cfg_scale: float = 1.0  # 1 = no guidance (a single forward per step)
    dit_compat: bool = False  # guide only the first 3 latent channels, as DiT's sample.py
    use_ema: bool = True
    num_samples: int = 1000
    batch_size: int = 100
    labels: str = "balanced"  # balanced: N/num_classes each | random: uniform
    seed: int = 0
    scm_mid_t: float = 1.1  # scm2: intermediate TrigFlow time
    out: Optional[str] = None  # default: {output_dir}/{experiment}/samples/{run}/{step:07d}/{sampler}.npz
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast of the network)
    progress: bool = True


@dataclass
class EvalConfig:
    """The reference, classifier and evaluate stages (torch-fidelity)."""

    extractor: str = "inception-v3-compat"  # inception-v3-compat | classifier
    inception_weights: Optional[str] = None  # default: torch hub cache, checkpoints/pt_inception-2015-12-05-6726825d.pth
    classifier_weights: Optional[str] = None  # default: {output_dir}/{experiment}/classifier/model.safetensors
    reference: Optional[str] = None  # default: {output_dir}/{experiment}/reference/stats-{extractor}.pt
    reference_npz: Optional[str] = None  # import an ADM reference batch (mu, sigma) for FID instead of the dataset
    reference_max_images: Optional[int] = None  # real images for the reference statistics (default: all)
    samples: Optional[str] = None  # the samples npz to evaluate
    out: Optional[str] = None  # default: the samples path with samples/ -> metrics/ and .npz -> .json
    metrics: List[str] = field(default_factory=lambda: ["fid", "kid", "isc", "prc"])
    label_accuracy: bool = False  # fraction of samples the dataset's classifier (classifier_weights) assigns to their label
    batch_size: int = 100
    num_workers: int = 0  # processes decoding real images for the reference stage
    kid_subset_size: int = 1000
    classifier_steps: int = 500
    classifier_batch_size: int = 64
    classifier_lr: float = 3.0e-3
    device: str = "auto"


@dataclass
class MeanFlowConfig:
    """The settings of the methods on MeanFlow's student (distill.method meanflow, imf; METHODS.md §4). Defaults: the
    paper's ImageNet-256 ones, without guidance."""

    p_mean: float = -0.4  # (t, r): two draws of logit-normal(p_mean, p_std), t the larger
    p_std: float = 1.0
    r_neq_t: float = 0.25  # the share of each batch with r ≠ t (the rest is flow matching, r = t)
    adaptive_p: float = 1.0  # the loss weight sg(1/(‖Δ‖² + c)^p); 0: plain L2
    adaptive_c: float = 1.0e-3
    omega: float = 1.0  # guidance in training: ṽ = ω·v + κ·u(z, t, t | y) + (1 − ω − κ)·u(z, t, t | ∅) (1, 0: none)
    kappa: float = 0.0
    guidance_t: List[float] = field(default_factory=lambda: [0.0, 1.0])  # the times t where guidance applies
    label_dropout: float = 0.0  # the share of labels dropped to the null class (the unconditional u guidance uses)


MEANFLOW_METHODS = ("meanflow", "imf")  # the methods that read distill.meanflow


@dataclass
class DistillSettings:
    """A consistency model from a trained DiT (stage `distill`): sCD of the teacher, or sCT from its weights."""

    method: str = "scd"  # the consistency method: a module of speedpipe.consistency.methods (scd, sct)
    teacher: Optional[str] = None  # ckpt-*.pt of a train run (its EMA weights are the teacher and the student's init);
    # null: no teacher, the run's own DiT (model.*) for a method that evaluates no teacher network (sct, meanflow)
    sigma_d: float = 0.5  # TrigFlow σ_d; the unit-variance latents are scaled by σ_d (data std σ_d, as in the paper)
    time_scale: float = 1.0  # the student's time input c_noise(t) = time_scale·t (the paper: t)
    warm_start_steps: int = 1_000  # TrigFlow diffusion fine-tune of the student before the method (steps 1..W)
    warm_start_target: str = "teacher"  # teacher: regress on the teacher's F | data: on the data's TrigFlow velocity
    p_mean: float = -1.0  # time proposal: tan t = e^τ/σ_d, τ ~ N(p_mean, p_std²)
    p_std: float = 1.4
    tangent_warmup: int = 10_000  # H: r = min(1, step/H)
    tangent_c: float = 0.1  # g ← g / (‖g‖ + c)
    cfg_scale: float = 1.0  # guidance of the teacher velocity (the warm start's target, and sCD's)
    steps: int = 20_000  # consistency steps (of distill.method) after the warm start
    global_batch_size: int = 256
    lr: float = 1.0e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    ema_decay: float = 0.9999
    log_every: int = 100
    ckpt_every: int = 5_000
    ckpt_steps: List[int] = field(default_factory=list)  # checkpoints also at exactly these (global) steps
    resume_every_steps: int = 0  # resume checkpoint latest.pt every N steps (0: off) ...
    resume_every_minutes: float = 30.0  # ... and every N minutes (0: off); also saved on SLURM's pre-timeout signal
    precision: str = "fp32"  # fp32 | bf16 (autocast of the network passes; tangent and loss in fp64)
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite tangent or loss instead of stopping
    run_dir: Optional[str] = None  # default: {output_dir}/{experiment}/distill/{method}-{teacher run, or no-teacher}
    device: str = "auto"
    progress: bool = True
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)


DistillConfig = with_declared_sections(DistillSettings, "DistillConfig", method_settings())  # distill.{method}.*


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: Optional[float] = None  # max global grad norm; null = no clipping
    warmup_steps: int = 0  # linear learning-rate warm-up from 0 over this many steps (DiT: none)
    fused: bool = True  # fused AdamW on CUDA, foreach elsewhere


@dataclass
class TrainerConfig:
    steps: int = 400_000
    global_batch_size: int = 256
    ema_decay: float = 0.9999
    log_every: int = 100
    ckpt_every: int = 50_000
    ckpt_steps: List[int] = field(default_factory=list)  # checkpoints also at exactly these steps (evaluated ones)
    resume_every_steps: int = 0  # resume checkpoint latest.pt every N steps (0: off) ...
    resume_every_minutes: float = 30.0  # ... and every N minutes (0: off); also saved on SLURM's pre-timeout signal
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    tf32: bool = True
    device: str = "auto"  # auto | cpu | cuda
    run_dir: Optional[str] = None  # default: {output_dir}/{experiment}/train/{method}-s{seed}
    progress: bool = True


@dataclass
class ConfigSettings:
    """A stage config: every stage's section (a stage of one's own adds its SETTINGS as the section {stage})."""

    experiment: str = "default"
    output_dir: str = "results"
    method: str = "baseline"  # label of this arm in results and reports
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_STAGES_OF_ONES_OWN = stage_declarations()
Config = with_declared_sections(ConfigSettings, "Config", {stage: settings for stage, settings in settings_of(STAGE_MODULES).items()
                                                           if stage in _STAGES_OF_ONES_OWN})


CHOICES = {
    "data.name": ("mnist5k", "image_folder", *source_settings()),
    "data.mnist_fit": ("pad", "resize"),
    "data.source": ("latents", "synthetic"),
    "data.latent_norm": ("none", "channel"),
    "distill.warm_start_target": ("teacher", "data"),
    "autoencoder.name": ("tiny", "sd-vae-ft-ema", "sd-vae-ft-mse"),
    "encode.mode": ("flip", "posterior"),
    "encode.dtype": ("fp16", "fp32"),
    "encode.device": ("auto", "cpu", "cuda"),
    "encode.precision": ("fp32", "bf16"),
    "sampling.labels": ("balanced", "random"),
    "sampling.device": ("auto", "cpu", "cuda"),
    "sampling.precision": ("fp32", "bf16"),
    "eval.extractor": ("inception-v3-compat", "classifier"),
    "eval.device": ("auto", "cpu", "cuda"),
    "distill.precision": ("fp32", "bf16"),
    "distill.device": ("auto", "cpu", "cuda"),
    "diffusion.noise_schedule": ("linear", "cosine"),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"),
}
POSITIVE = ("trainer.steps", "trainer.global_batch_size", "trainer.log_every", "trainer.ckpt_every",
            "diffusion.diffusion_steps", "model.input_size", "model.in_channels", "model.num_classes",
            "data.synthetic_size", "data.image_size", "optim.lr", "autoencoder.steps", "autoencoder.batch_size",
            "autoencoder.lr", "autoencoder.ckpt_every", "autoencoder.log_every", "autoencoder.latent_channels", "encode.shard_size",
            "encode.batch_size", "sampling.num_samples", "sampling.batch_size", "sampling.cfg_scale", "eval.batch_size",
            "eval.kid_subset_size", "eval.classifier_steps", "eval.classifier_batch_size", "distill.sigma_d", "distill.time_scale", "distill.p_std",
            "distill.tangent_warmup", "distill.steps", "distill.global_batch_size", "distill.lr", "distill.log_every",
            "distill.ckpt_every")


class Range(NamedTuple):
    """The valid values of a numeric key: low..high, `ends` saying which end is included ("[", "]") or excluded ("(",
    ")"); null too where `null`; a list key (`each`): one or more values (exactly `length` if set), each in the range."""

    low: float
    high: float = math.inf
    ends: str = "[)"
    null: bool = False
    each: bool = False
    length: int | None = None
    note: str = ""  # what a special value means, for the message

    def holds(self, value) -> bool:
        if value is None:
            return self.null
        values = value if self.each else [value]
        if self.each and (len(values) != self.length if self.length is not None else not values):
            return False
        return all((self.low < v or (self.ends[0] == "[" and v == self.low))
                   and (v < self.high or (self.ends[1] == "]" and v == self.high)) for v in values)

    def expected(self) -> str:
        shown = lambda x: {math.inf: "inf", math.pi / 2: "pi/2"}.get(x, f"{x:g}")  # noqa: E731
        interval = f"{self.ends[0]}{shown(self.low)}, {shown(self.high)}{self.ends[1]}"
        what = (f"{self.length or 'one or more'} values, each in {interval}" if self.each else f"a value in {interval}")
        return ("null or " if self.null else "") + what + (f" ({self.note})" if self.note else "")


UNIT = Range(0, 1, "[)")  # an EMA decay or a dropout probability (1 would freeze the average, drop every label)
ADAM_BETAS = Range(0, 1, "[)", each=True, length=2)
RANGES = {  # key: its valid values, beyond POSITIVE (every float of the config is also checked finite)
    "model.class_dropout_prob": UNIT, "trainer.ema_decay": UNIT, "distill.ema_decay": UNIT,
    "optim.betas": ADAM_BETAS, "distill.betas": ADAM_BETAS, "optim.eps": Range(0, ends="()"), "optim.weight_decay": Range(0),
    "optim.grad_clip": Range(0, null=True, note="null or 0: no clipping"), "optim.warmup_steps": Range(0, note="0: none"),
    "distill.warm_start_steps": Range(0, note="0: none"),
    **{f"{section}.{key}": Range(0, note="0: off") for section in ("trainer", "distill", "autoencoder")
       for key in ("resume_every_steps", "resume_every_minutes")},
    "autoencoder.kl_weight": Range(0), "autoencoder.block_out_channels": Range(1, each=True),
    "encode.num_workers": Range(0, note="0: the main process"), "eval.num_workers": Range(0, note="0: the main process"),
    "eval.reference_max_images": Range(0, null=True, note="null or 0: all images"), "eval.classifier_lr": Range(0, ends="()"),
    "sampling.ddim_eta": Range(0, 1, "[]", note="0: deterministic, 1: DDPM's variance"),
    "sampling.scm_mid_t": Range(0, math.pi / 2, "()", note="a TrigFlow time: 0 is the data, pi/2 pure noise"),
    "distill.tangent_c": Range(0),
    "distill.meanflow.p_std": Range(0, ends="()"), "distill.meanflow.r_neq_t": Range(0, 1, "[]"),
    "distill.meanflow.adaptive_p": Range(0, note="0: plain L2"), "distill.meanflow.adaptive_c": Range(0, ends="()"),
    "distill.meanflow.guidance_t": Range(0, 1, "[]", each=True, length=2), "distill.meanflow.label_dropout": UNIT,
}
