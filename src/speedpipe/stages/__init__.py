"""The stage registry: every pipeline stage's module, config phase, version and what it reads.

The CLI, the launcher, the experiment (speedpipe.workflow) and the Snakemake rules take the stages from here.

- `reads`: the config keys (dotted; a section stands for all of its keys) whose values can change the stage's
  output files (log.csv and checkpoints included; device, precision and tf32 too: they change the numbers). They
  are its jobs' rerun triggers.
- `uses`: keys the stage reads that cannot change its outputs: progress bars, the resume-checkpoint cadence, loader
  workers, whether a download is allowed. Where the job runs (the launcher) and its threads are not config keys.

A stage runs on a view of its config that holds exactly these keys (`view`): reading any other key stops it with an
error naming the stage and the key, so no stage depends on a setting its jobs' params do not carry. A job's params
are `Stage.params(config)`: the stage's version and the read values that differ from the schema's defaults, so a
key added to the code at its default changes no finished job's params. Changing a default, like any other change of
a stage's behaviour, is a version bump. The full resolved config stays every stage's provenance: config.yaml beside
its outputs, and the config a checkpoint carries (what a later stage rebuilds the model from).
"""
import functools
import importlib
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from speedpipe.config import leaves
from speedpipe.config_schema import MEANFLOW_METHODS, MeanFlowConfig, ModelConfig
from speedpipe.declared import method_settings, source_settings, stage_declarations
from speedpipe.experiment_schema import schema_defaults
from speedpipe.sampler_labels import parse_sampler

IDENTITY = ("experiment", "output_dir")
GIVEN = ("data.latents_dir", "eval.reference", "eval.classifier_weights", "autoencoder.path")  # the files a pipeline job can be given  # the experiment's results folder: every stage's default paths
# data.images.open_image_dataset: the built-in sources' keys, and each source's own (speedpipe.data.sources), which only
# the jobs of an experiment on that source read (SOURCE_READS)
SOURCE_KEYS = tuple(f"data.{source}.{key}" for source, settings in source_settings().items() for key in settings)
IMAGES = ("data.name", "data.root", "data.image_size", "data.mnist_fit", "data.strict", *SOURCE_KEYS)
SOURCE_READS = tuple((key, lambda c, source=key.split(".")[1]: c["data"]["name"] == source) for key in SOURCE_KEYS)
LATENTS = ("data.source", "data.synthetic_size", "data.latents_dir", "data.latent_norm", "data.random_flip")  # open_training_data


def loop_uses(section: str) -> tuple[str, ...]:
    """The keys of a long stage's resumable loop that do not change its results (speedpipe.loop)."""
    return tuple(f"{section}.{key}" for key in ("progress", "resume_every_steps", "resume_every_minutes"))


class UndeclaredRead(KeyError):
    """A stage read a config key its registry entry does not declare (a defect of the code, not of the config)."""

    def __str__(self):
        return self.args[0]


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str | None  # the config-file phase sub-dict (train:, sample:) merged over the top level; None: none
    version: int  # bump when the stage's behaviour changes: Snakemake re-runs its jobs (it does not see code edits)
    reads: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    read_if: tuple = ()  # (key, whether a job with this plain config reads it): keys of a section only some jobs read
    given: tuple[str, ...] = ()  # the keys (of GIVEN) a pipeline job is given: where the files of the stages before it lie
    config: str = "stage"  # stage: a speedpipe.config_schema.Config | report: speedpipe.workflow.Experiment.report_config()
    ranks: bool = False  # whether its work is split over the tasks of a multi-task job (else it runs in one process)

    def __post_init__(self):
        if not set(self.given) <= set(GIVEN):
            raise TypeError(f"stage {self.name!r}: given {sorted(set(self.given) - set(GIVEN))}: a pipeline job is given only "
                            f"{list(GIVEN)} (speedpipe.workflow.Experiment._pipeline_paths)")

    @property
    def module(self) -> str:
        return f"speedpipe.stages.{self.name}"

    def view(self, config) -> "DictConfig":  # noqa: F821
        """The config as the stage sees it: only its reads and uses, read-only; another key raises."""
        from omegaconf import OmegaConf

        plain = _plain(config)
        if self.config == "report":
            picked = plain
        else:
            picked = {}
            for key in (*self.reads, *self.uses):
                _put(picked, key, _get(plain, key, self.name))
        view = OmegaConf.create(picked)
        OmegaConf.set_struct(view, True)
        OmegaConf.set_readonly(view, True)
        return view

    def params(self, config) -> dict:
        """What a job of this stage carries as Snakemake params: version and read values that differ from the defaults."""
        plain, defaults = _plain(config), _defaults(self.config)
        if self.config == "report":
            values = leaves(plain)
        else:
            values = {}
            for key in self.reads:
                value = _get(plain, key, self.name)
                values.update(leaves(value, key) if isinstance(value, dict) else {key: value})
            unread = {key for key, reads in self.read_if if not reads(plain)}
            values = {k: v for k, v in values.items() if k not in self.uses and k not in unread}
        return {"version": self.version, "reads": {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}}

    def run_settings(self, config) -> dict:
        """What a resumed run (or a kept latent shard) must share with the run that made it: the stage's version and the
        read values except the run's length, its checkpoint and log cadence, and where its data and its outputs lie (a
        continued run may change them; the stages record their data's content: a dataset's fingerprint, a latent store's
        checksums). Whatever re-runs a job also keeps it from resuming another version's state."""
        from speedpipe.fingerprint import content_fingerprint

        params = self.params(config)
        cache = Path(".snakemake")
        reads = with_contents(params["reads"], _plain(config), lambda path: content_fingerprint(
            path, cache / "speedpipe-fingerprints" if cache.is_dir() else None))
        return {"version": params["version"], **{k: v for k, v in reads.items()
                                                 if k not in LOCATIONS and k.rsplit(".", 1)[-1] not in CONTINUABLE}}

    def made_otherwise(self, recorded, config) -> list[str]:
        """The keys this stage reads (locations aside) whose values differ between a config its outputs were made with and
        another: what a re-run with `config` would change in them."""
        made, wanted = self.params(recorded)["reads"], self.params(config)["reads"]
        return sorted(k for k in {*made, *wanted} - set(LOCATIONS) if made.get(k) != wanted.get(k))

    @staticmethod
    def settings_differ(recorded: dict, current: dict) -> list[str]:
        """The keys whose values differ between the settings a run (or a shard) recorded and the current ones. Locations
        are not compared, so records made before they were left out of the settings still match."""
        return sorted(k for k in {*recorded, *current} - set(LOCATIONS) if recorded.get(k) != current.get(k))

    def run(self, config):
        """Run the stage on a resolved config (plain values or a DictConfig)."""
        return importlib.import_module(self.module).run(config)

    def entry(self, run):
        """Decorate a stage module's `run(cfg, provenance)`: called with a full config, it runs on the stage's view
        with the full config as provenance, and a read of an undeclared key raises UndeclaredRead."""
        from omegaconf import OmegaConf
        from omegaconf.errors import ConfigAttributeError, ConfigKeyError

        @functools.wraps(run)
        def run_on_view(config):
            stage = STAGES[self.name]  # the registry's entry when the stage runs
            full = OmegaConf.create(_plain(config))
            view = stage.view(full)
            try:
                return run(view, full)
            except (ConfigAttributeError, ConfigKeyError) as err:
                key = getattr(err, "full_key", None)
                in_view = any(getattr(err, "parent_node", None) is node for node in _nodes(view))
                if stage.config == "report" or not key or not in_view or OmegaConf.select(full, key, default=_ABSENT) is _ABSENT:
                    raise  # not a read of the view (e.g. of a checkpoint's own config)
                raise UndeclaredRead(f"stage {stage.name!r} read the config key {key!r}, which its registry entry "
                                     f"(speedpipe.stages.STAGES) does not declare: add it to its reads (it can change "
                                     f"the outputs) or to its uses") from err

        return run_on_view


_ABSENT = object()
DATA_STAGES = ("autoencoder", "encode", "classifier", "reference")  # what every run of an experiment reads: its data
CONTINUABLE = ("steps", "ckpt_steps", "log_every", "ckpt_every", "run_dir")
LOCATIONS = (*IDENTITY, "data.root", "data.latents_dir")
# Config keys naming a user's input file or folder (no rule makes it, so Snakemake does not see it change): a job's
# params carry the content fingerprint of what each names (speedpipe.fingerprint), not its path, so editing the data
# re-runs the jobs that read it and moving it re-runs none (speedpipe.workflow.Experiment.job_params).
# autoencoder.path only for a pretrained autoencoder: the tiny one's is the pipeline's own file, a rule input like
# eval.classifier_weights, eval.reference and data.latents_dir.
INPUT_FILES = ("data.root", "autoencoder.path", "eval.inception_weights", "eval.reference_npz", "model.init_from")


def with_contents(reads: dict, config: dict, fingerprint) -> dict:
    """A stage's read values with each user input (INPUT_FILES) that names an existing file or folder replaced by
    {"content": fingerprint(path)}: the job's params (what re-runs it) and a run's settings (what it may resume) both
    follow the data, not where it lies. A path that does not exist (a hub id) is kept as it is."""
    out = dict(reads)
    for key in INPUT_FILES:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        if key == "autoencoder.path" and config["autoencoder"]["name"] == "tiny":
            continue  # the pipeline's own autoencoder: a rule input
        if key == "data.root" and config["data"]["name"] == "mnist5k":
            continue  # the built-in digits read no folder (data.images.open_image_dataset)
        if Path(value).exists():
            out[key] = {"content": fingerprint(str(Path(value).absolute()))}
    return out



def _sampler(config: dict):
    return parse_sampler(config["sampling"]["sampler"])


# The sampling section's keys that only some samplers read: an edit of one re-runs only the jobs of those samplers
# (scm_mid_t: a consistency student's two-step sampler; ddim_eta: DDIM; guidance: the diffusion samplers).
SAMPLER_READS = (("sampling.scm_mid_t", lambda c: _sampler(c).name == "scm2"),
                 ("sampling.ddim_eta", lambda c: _sampler(c).family == "ddim"),
                 ("sampling.cfg_scale", lambda c: not _sampler(c).consistency),
                 ("sampling.dit_compat", lambda c: not _sampler(c).consistency))

def _reads_meanflow(config: dict) -> bool:
    return config["distill"]["method"] in MEANFLOW_METHODS


def _method_is(method: str):
    return lambda config: config["distill"]["method"] == method


# A method's settings are read only by its jobs: distill.meanflow by MeanFlow's student's methods, the sCM tangent's
# settings by the others, the section distill.{method} a method declares (SETTINGS) by that method.
METHOD_READS = (*((f"distill.meanflow.{f.name}", _reads_meanflow) for f in fields(MeanFlowConfig)),
                *((f"distill.{key}", lambda c: not _reads_meanflow(c)) for key in ("tangent_warmup", "tangent_c")),
                *((f"distill.{method}.{key}", _method_is(method)) for method, settings in method_settings().items()
                  for key in settings))


def _without_teacher(config: dict) -> bool:
    return not config["distill"]["teacher"]


# A student without a teacher is the run's own DiT on latents normalised per data.latent_norm; with one, the teacher's
# checkpoint brings all three, and distill.cfg_scale guides the teacher.
TEACHER_READS = (*((f"model.{f.name}", _without_teacher) for f in fields(ModelConfig)),
                 ("diffusion.learn_sigma", _without_teacher), ("data.latent_norm", _without_teacher),
                 ("distill.cfg_scale", lambda c: not _without_teacher(c)))

STAGES = {s.name: s for s in (
    Stage("autoencoder", None, 2,  # 2: the scale factor from streamed float64 moments
          reads=(*IDENTITY, "seed", *IMAGES, "autoencoder.name", "autoencoder.block_out_channels", "autoencoder.latent_channels",
                 "autoencoder.steps", "autoencoder.batch_size", "autoencoder.lr", "autoencoder.kl_weight", "autoencoder.log_every",
                 "autoencoder.ckpt_every"),
          read_if=SOURCE_READS, uses=loop_uses("autoencoder")),
    Stage("encode", None, 1,
          reads=(*IDENTITY, "seed", *IMAGES, "data.latents_dir", "autoencoder.name", "autoencoder.path", "encode.mode",
                 "encode.shard_size", "encode.dtype", "encode.batch_size", "encode.device", "encode.precision"),
          given=("data.latents_dir", "autoencoder.path"), read_if=SOURCE_READS,
          uses=("autoencoder.allow_download", "encode.num_workers", "encode.progress"), ranks=True),
    Stage("classifier", None, 1,
          reads=(*IDENTITY, "seed", *IMAGES, "eval.classifier_steps", "eval.classifier_batch_size", "eval.classifier_lr"),
          read_if=SOURCE_READS),
    Stage("reference", None, 2,  # 2: eval.reference_max_images spread over the dataset (was its first images)
          reads=(*IDENTITY, *IMAGES, "eval.extractor", "eval.inception_weights", "eval.classifier_weights", "eval.reference",
                 "eval.reference_npz", "eval.reference_max_images", "eval.batch_size", "eval.device"),
          given=("eval.reference", "eval.classifier_weights"), read_if=SOURCE_READS, uses=("eval.num_workers",), ranks=True),
    # 3: a generator per random stream (timesteps, dropout, flips, posterior, noise) and the initialisation's own seed
    Stage("train", "train", 3,
          reads=(*IDENTITY, "seed", "method", *LATENTS, "model", "diffusion", "optim", "trainer"), given=("data.latents_dir",),
          uses=loop_uses("trainer"), ranks=True),
    # 4: consistency methods (distill.method), the DiT's own tangent in the graded pass. 5: the training's random
    # streams (speedpipe.training.StepRandomness)
    Stage("distill", "train", 5,
          reads=(*IDENTITY, "seed", *LATENTS, "distill", "model", "diffusion.learn_sigma"),
          read_if=(*METHOD_READS, *TEACHER_READS), given=("data.latents_dir",),
          uses=loop_uses("distill"), ranks=True),
    Stage("sample", "sample", 4,  # 4: labels and each batch's noise from streams of their own; students under bf16 too
          reads=(*IDENTITY, "autoencoder.name", "autoencoder.path", "sampling"), read_if=SAMPLER_READS, given=("autoencoder.path",),
          uses=("autoencoder.allow_download", "sampling.progress"), ranks=True),
    Stage("evaluate", None, 3,  # 3: unsupported metrics left out with the reason, samples streamed
          reads=(*IDENTITY, "eval.samples", "eval.out", "eval.metrics", "eval.label_accuracy", "eval.batch_size",
                 "eval.kid_subset_size", "eval.extractor", "eval.inception_weights", "eval.classifier_weights", "eval.reference",
                 "eval.device"), given=("eval.reference", "eval.classifier_weights")),
    # 4: a section per consistency method; 5: log axes ticked at the evaluations, missing values as –; 6: the students over
    # their teachers (scm_across_teachers), students without a teacher; 7: the consistency section says which students
    # start from a teacher and which from none
    Stage("report", None, 7, config="report"),
)}


# Stages of one's own: a module here that declares its entry, STAGE = {"version": 1, "reads": [...], ...} (and its
# settings, the config section {stage}), read without importing it (speedpipe.declared); its job is one per experiment,
# named like the stage (workflow/rules/stages/{stage}.smk), and the report waits on it (its usage record).
STAGES.update({name: Stage(name, **{"phase": None, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}})
               for name, entry in stage_declarations().items()})
PLUGIN_STAGES = tuple(stage_declarations())


def _nodes(config) -> list:
    """Every mapping node of a DictConfig (itself included)."""
    from omegaconf import DictConfig

    nodes = [config]
    for value in config.values():
        if isinstance(value, DictConfig):
            nodes += _nodes(value)
    return nodes


def _plain(config) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config


def _get(plain: dict, key: str, stage: str):
    node = plain
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"stage {stage!r} declares the config key {key!r}, which the config does not have")
        node = node[part]
    return node


def _put(tree: dict, key: str, value):
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


@lru_cache(maxsize=None)
def _default_leaves(kind: str) -> tuple:
    if kind == "report":  # the experiment file's documented defaults (its JSON schema)
        return tuple(leaves({"pipeline": schema_defaults()}).items())
    from omegaconf import OmegaConf

    from speedpipe.config_schema import Config

    return tuple(leaves(OmegaConf.to_container(OmegaConf.structured(Config))).items())


def _defaults(kind: str) -> dict:
    return dict(_default_leaves(kind))
