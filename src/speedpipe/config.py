"""Configuration: OmegaConf YAML with SpeeD-style base.yaml inheritance, validated against dataclass schemas.

load_config("configs/image/imagenet_256/speed.yaml", ["optim.lr=2e-4"], phase="train") merges, lowest
priority first: every base.yaml from configs/ down to the file's folder, the file, the phase sub-dict
(`train:`, `inference:` or `sample:`) over the top level, then the command-line overrides. An override whose
value is a mapping (`diffusion.timestep_sampler={name: uniform}`) replaces that section instead of merging
into it, so switching a method never inherits the old method's parameters. Unknown keys,
wrong types and impossible values are refused with the dotted key named, before anything runs.
"""
import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speedpipe.errors import ConfigError

PHASES = ("train", "inference", "sample")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # experiment, method and table names: they become folder and file names
NAME_RULE = "names are letters, digits, '_', '.' and '-' (they become folder and file names), starting with a letter or digit"


@dataclass
class SamplerConfig:
    """Timestep sampler: uniform | speed (k, tau, dual) | lognormal (p_mean, p_std) | logit_normal (m, s) |
    clts (mu, sigma, ramp_steps). Unset = the method's default."""

    name: str = "uniform"
    k: Optional[float] = None
    tau: Optional[int] = None
    dual: Optional[bool] = None
    p_mean: Optional[float] = None
    p_std: Optional[float] = None
    m: Optional[float] = None
    s: Optional[float] = None
    mu: Optional[float] = None
    sigma: Optional[float] = None
    ramp_steps: Optional[int] = None


@dataclass
class WeightingConfig:
    """Per-timestep MSE weight: none | speed (lam, tau) | p2 (k, gamma) | min_snr (gamma) | sigmoid (b)."""

    name: str = "none"
    lam: Optional[float] = None
    tau: Optional[int] = None
    k: Optional[float] = None
    gamma: Optional[float] = None
    b: Optional[float] = None


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
class DataConfig:
    """Images (for the autoencoder, encode and reference stages) and the latent source training reads."""

    name: str = "mnist5k"  # mnist5k | image_folder
    root: Optional[str] = None  # image_folder: root/<class_name>/*.{JPEG,jpg,png,webp}, or a flat folder
    image_size: int = 32
    mnist_fit: str = "pad"  # mnist5k 28x28 -> image_size: pad (centred) | resize (bicubic)
    strict: bool = False  # an unreadable image stops the run instead of being skipped and counted
    source: str = "latents"  # what training reads: latents (the encode stage's store) | synthetic (tests)
    latents_dir: Optional[str] = None  # default: {output_dir}/{experiment}/latents
    random_flip: bool = True  # use the stored latent of the horizontally flipped image half the time
    latent_norm: str = "none"  # none (DiT: the scaled latents as they are) | channel (per-channel zero mean, unit std)
    synthetic_size: int = 512  # number of synthetic examples (source: synthetic)


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
class DistillConfig:
    """A consistency model from a trained DiT (stage `distill`): sCD of the teacher, or sCT from its weights."""

    method: str = "scd"  # the consistency method: a module of speedpipe.consistency.methods (scd, sct)
    teacher: Optional[str] = None  # ckpt-*.pt of a train run (its EMA weights are the teacher and the student's init)
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
    run_dir: Optional[str] = None  # default: {output_dir}/{experiment}/distill/{method}-{teacher run}
    device: str = "auto"
    progress: bool = True


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
class Config:
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


CHOICES = {
    "data.name": ("mnist5k", "image_folder"),
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
}


def base_chain(path: Path) -> list[Path]:
    """Every base.yaml from the outermost `configs` folder above `path` down to path's own folder."""
    folders = [path.parent]
    root = next((p for p in reversed(path.parents) if p.name == "configs"), None)
    if root is not None:
        folders = [p for p in reversed(path.parents) if p == root or root in p.parents]
    chain = [f / "base.yaml" for f in folders if (f / "base.yaml").is_file()]
    return [p for p in chain if p.resolve() != path.resolve()]


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return cfg


def _check_keys(raw: Any, schema: type, prefix: str = ""):
    """Refuse keys the schema does not know, naming the dotted path and the closest valid key."""
    if not isinstance(raw, (dict, DictConfig)):
        return
    hints = get_type_hints(schema)
    for key in raw:
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {sorted(hints)}"
            raise ConfigError(f"unknown config key '{dotted}': {hint}")
        sub = hints[key]
        if get_origin(sub) is not None and type(None) in get_args(sub):
            sub = next(a for a in get_args(sub) if a is not type(None))
        if dataclasses.is_dataclass(sub):
            value = raw[key]
            if value is not None and not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"config key '{dotted}': expected a mapping of {sub.__name__} fields, got {value!r}")
            _check_keys(value, sub, dotted + ".")


def validate(cfg: DictConfig) -> DictConfig:
    """Semantic checks beyond types: finite numbers, choices, ranges, names the code can build."""
    from speedpipe.consistency.methods import method_names
    from speedpipe.diffusion import create_diffusion
    from speedpipe.diffusion.timesteps import build_sampler, build_weighting
    from speedpipe.models.dit import DiT_models
    from speedpipe.sampler_labels import parse_sampler

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        message = str(getattr(err, 'msg', err)).splitlines()[0]
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': {message}") from None
    _check_finite(plain)

    def value(key):
        return functools.reduce(dict.__getitem__, key.split("."), plain)

    if not NAME.fullmatch(plain["experiment"]):
        raise ConfigError(f"config key 'experiment': {plain['experiment']!r}: {NAME_RULE}")
    for key, allowed in CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"config key '{key}': {value(key)!r} is not one of {list(allowed)}")
    for key in POSITIVE:
        if value(key) is None or value(key) <= 0:
            raise ConfigError(f"config key '{key}': expected a positive number, got {value(key)!r}")
    for key, valid in RANGES.items():
        if not valid.holds(value(key)):
            raise ConfigError(f"config key '{key}': expected {valid.expected()}, got {value(key)!r}")
    if cfg.model.name not in DiT_models:
        close = difflib.get_close_matches(cfg.model.name, list(DiT_models), n=1)
        raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        label = parse_sampler(cfg.sampling.sampler)
    except ValueError as err:
        raise ConfigError(f"config key 'sampling.sampler': {err}") from None
    if label.cfg_scale != 1.0:
        raise ConfigError(f"config key 'sampling.sampler': {cfg.sampling.sampler!r}: guidance is sampling.cfg_scale here")
    if cfg.distill.method not in method_names():
        raise ConfigError(f"config key 'distill.method': {cfg.distill.method!r} is not one of {method_names()} "
                          f"(the modules of speedpipe.consistency.methods)")
    unknown_metrics = sorted(set(cfg.eval.metrics) - {"fid", "kid", "isc", "prc"})
    if unknown_metrics:
        raise ConfigError(f"config key 'eval.metrics': unknown {unknown_metrics}; expected a subset of [fid, kid, isc, prc]")
    for key, total in (("trainer.ckpt_steps", cfg.trainer.steps), ("distill.ckpt_steps", cfg.distill.warm_start_steps + cfg.distill.steps)):
        outside = [s for s in value(key) if not 0 < s <= total]
        if outside:
            raise ConfigError(f"config key '{key}': steps {outside} lie outside 1..{total}")
    if cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.diffusion_steps <= 20:
        raise ConfigError(f"config key 'diffusion.diffusion_steps': {cfg.diffusion.diffusion_steps} steps of the linear schedule "
                          f"end at β = 20/T ≥ 1 (no noise level is left); expected more than 20 (DiT: 1000)")
    diffusion = create_diffusion(noise_schedule=cfg.diffusion.noise_schedule, diffusion_steps=cfg.diffusion.diffusion_steps)
    for key, build in (("diffusion.timestep_sampler", build_sampler), ("diffusion.loss_weighting", build_weighting)):
        section = OmegaConf.select(cfg, key)
        try:
            build(section.name, diffusion, **named_params(section))
        except ValueError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
    return cfg


def _check_finite(tree, prefix: str = ""):
    """Refuse NaN and infinity anywhere in a plain config (every float, in lists too), naming the key."""
    items = tree.items() if isinstance(tree, dict) else ((f"[{i}]", v) for i, v in enumerate(tree))
    for key, value in items:
        dotted = f"{prefix}{key}" if not prefix or isinstance(tree, list) else f"{prefix}.{key}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{dotted}': expected a finite number, got {value!r}")
        if isinstance(value, (dict, list)):
            _check_finite(value, dotted)


def named_params(section: DictConfig | dict) -> dict:
    """The parameters of a {name: ..., param: value} section that are set (not null), without the name."""
    items = section.items() if isinstance(section, dict) else OmegaConf.to_container(section).items()
    return {k: v for k, v in items if k != "name" and v is not None}


def _merged_file(path: Path, phase: str | None) -> DictConfig:
    """The config file's own values: its base.yaml chain, the file, then its phase sub-dict (no overrides, no defaults)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if phase is not None and phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; expected one of {list(PHASES)}")
    merged = OmegaConf.merge(*[_read_yaml(p) for p in base_chain(path)], _read_yaml(path))
    phase_dicts = {p: merged.pop(p) for p in PHASES if p in merged}
    if phase in phase_dicts and phase_dicts[phase] is not None:
        merged = OmegaConf.merge(merged, phase_dicts[phase])
    return merged


def leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every non-mapping value of a nested mapping (lists and empty mappings are values)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out.update(leaves(value, dotted) if isinstance(value, dict) and value else {dotted: value})
    return out


def file_values(path, phase: str | None = None) -> dict[str, tuple[Any, Path]]:
    """{dotted key: (value, the file that sets it)} of every value a config file sets itself, with its base.yaml files
    and its phase sub-dict (the last file of the chain that sets a key wins, as in load_config)."""
    path = Path(path)
    values = {}
    for file in [*base_chain(path), path]:
        raw = OmegaConf.to_container(_read_yaml(file), resolve=False)
        phase_dict = raw.get(phase) if phase else None
        for p in PHASES:
            raw.pop(p, None)
        values.update({k: (v, file) for k, v in leaves(raw).items()})
        values.update({k: (v, file) for k, v in leaves(phase_dict or {}).items()})
    return values


def load_config(path, overrides: list[str] | tuple[str, ...] = (), phase: str | None = None, schema: type = Config) -> DictConfig:
    """Load, merge and validate a config: see the module docstring for the merge order."""
    merged = _merged_file(Path(path), phase)
    for item in overrides:
        key, value = parse_override(item)
        OmegaConf.update(merged, key, value, merge=not isinstance(value, dict))
    _check_keys(merged, schema)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), merged)
    except OmegaConfBaseException as err:
        message = str(getattr(err, 'msg', err)).splitlines()[0]
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': {message}") from None
    return validate(cfg) if schema is Config else cfg


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value as YAML reads it; ${...} kept unresolved, to resolve in the merged config)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected the form key.path=value")
    key = item.split("=", 1)[0]
    value = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    for part in key.split("."):
        value = value[part]
    return key, value


def to_plain(cfg: DictConfig) -> dict:
    """Resolved plain Python values (what Snakemake params and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path) -> None:
    from speedpipe.io import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
