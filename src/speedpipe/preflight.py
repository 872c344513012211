"""What can be checked before a long job starts, checked when an experiment is planned (every `snakemake` call).

Each check reads the resolved stage configs of the experiment's jobs and only what is cheap to read: file and folder
existence, npz headers, the number of image files (remembered per folder state, see data.images.count_images). A
problem names the config key, the value and what was expected, and every problem found is reported at once, before
any job is submitted -- never after a teacher has trained.
"""
from pathlib import Path

from omegaconf import OmegaConf

from speedpipe.errors import ConfigError
from speedpipe.experiment_file import sampler_label
from speedpipe.workflow import Experiment

CACHE = Path(".snakemake") / "speedpipe-datasets"


def problems(exp: Experiment) -> list[str]:
    """Every problem of the experiment's inputs and settings that would stop one of its jobs."""
    found = []
    data = exp.stage_config("encode")
    size = _dataset_size(data, found)
    found += _missing_inputs(exp, data)
    found += _batches_larger_than_the_data(exp, size)
    found += _guidance_without_a_null_class(exp)
    found += _students_without_a_teacher(exp)
    found += _data_made_otherwise(exp)
    return found


def _data_made_otherwise(exp: Experiment) -> list[str]:
    """With data_from: each data stage's files must exist and have been made with the settings this experiment would make
    them with (the stage's reads, locations aside), as the config recorded beside them says."""
    import yaml
    from omegaconf import OmegaConf

    from speedpipe.layout import data_record
    from speedpipe.stages import DATA_STAGES, STAGES

    if not exp.data_from:
        return []
    found = []
    for stage in (s for s in DATA_STAGES if exp.needs_stage(s)):
        wanted = exp.stage_config(stage)
        path = data_record(stage, OmegaConf.create({**wanted, "experiment": exp.data_from}))
        if not path.is_file():
            found.append(f"data_from: {exp.data_from}: {path} not found: run that experiment's {stage} stage first (or drop "
                         f"data_from to make this experiment's own)")
            continue
        made = yaml.safe_load(path.read_text())
        differ = STAGES[stage].made_otherwise(made, wanted)
        if differ:
            found.append(f"data_from: {exp.data_from}: its {stage} stage was made with other settings ("
                         + ", ".join(f"{k}: {_read(made, k)!r} there, {_read(wanted, k)!r} here" for k in differ)
                         + "): drop data_from, or match them")
    return found


def _read(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def refusal(exp: Experiment, found: list[str]) -> ConfigError:
    return ConfigError(f"experiment {exp.pipe['experiment']!r}: {len(found)} problem(s) found before anything ran:\n- "
                       + "\n- ".join(found))


def _dataset_size(cfg: dict, found: list) -> int | None:
    from speedpipe.data.folders import MNIST5K_SIZE, DataError, count_images

    d = cfg["data"]
    if d["name"] == "mnist5k":
        return MNIST5K_SIZE
    if d["name"] != "image_folder":  # a source of speedpipe.data.sources: opened (and torch imported) to count it
        from omegaconf import OmegaConf

        from speedpipe.data.images import open_image_dataset

        try:
            return len(open_image_dataset(OmegaConf.create(d)))
        except (DataError, OSError, ValueError) as err:
            found.append(f"data.name {d['name']}: {err}")
            return None
    if d["root"] is None:
        found.append("config key 'data.root': required for data.name=image_folder (the folder of the images)")
        return None
    try:
        return count_images(d["root"], CACHE if CACHE.parent.is_dir() else None)[0]
    except DataError as err:
        found.append(str(err))
        return None


def _missing_inputs(exp: Experiment, data: dict) -> list[str]:
    """Weights files and folders the jobs read that are not there (nothing is downloaded at run time)."""
    found = []
    ae = data["autoencoder"]
    if ae["name"] != "tiny" and not ae["allow_download"]:
        source = ae["path"] or f"stabilityai/{ae['name']}"  # a local folder, else a Hugging Face hub id
        if Path(source).is_dir():
            if not (Path(source) / "config.json").is_file():
                found.append(f"config key 'autoencoder.path': {source} holds no config.json: expected a diffusers "
                             f"AutoencoderKL folder (save_pretrained: config.json and diffusion_pytorch_model.safetensors)")
        else:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(source, "config.json"), str):
                found.append(f"config key 'autoencoder.path': {source!r} is neither a folder nor in the Hugging Face cache: "
                             f"set autoencoder.path to an AutoencoderKL folder (save_pretrained), or download it on a "
                             f"machine with network (huggingface-cli download {source})")
    evaluate = exp.stage_config("evaluate", evaluation=exp.evaluations()[0])["eval"]
    reference = exp.stage_config("reference")["eval"]
    if exp.pipe["extractor"] == "inception-v3-compat":  # (torch-fidelity imported only where its weights are needed)
        from speedpipe.fidelity import EvaluationError, inception_weights_path

        try:
            inception_weights_path(evaluate["inception_weights"])
            inception_weights_path(reference["inception_weights"])
        except EvaluationError as err:
            found.append(f"config key 'eval.inception_weights': {err}")
    if reference["reference_npz"]:
        from speedpipe.fidelity import EvaluationError
        from speedpipe.stages.reference import check_adm_batch

        try:
            check_adm_batch(reference["reference_npz"], reference["extractor"])
        except EvaluationError as err:
            found.append(str(err))
    first_runs = {run.method.name: run for run in reversed(exp.train_runs.values())}
    for method, run in first_runs.items():
        init_from = exp.stage_config("train", run)["model"]["init_from"]
        if init_from and not Path(init_from).is_file():
            found.append(f"methods.{method}: config key 'model.init_from': {init_from} does not exist")
    return found


def _batches_larger_than_the_data(exp: Experiment, size: int | None) -> list[str]:
    """Every batch drawn from the dataset must fit in it (the autoencoder and classifier train on 9 in 10 images)."""
    if size is None:
        return []
    found, training_split = [], size - len(range(0, size, 10))  # the stages' held_out: every 10th image is held out
    batches = []
    if exp.runs_stage("autoencoder"):
        batches.append(("autoencoder", "autoencoder.batch_size", exp.stage_config("autoencoder")["autoencoder"]["batch_size"], training_split))
    if exp.runs_stage("classifier"):
        batches.append(("classifier", "eval.classifier_batch_size", exp.stage_config("classifier")["eval"]["classifier_batch_size"],
                        training_split))
    for run in exp.train_runs.values():
        cfg = exp.stage_config("train", run)
        batches.append((f"train run {run.name}", "trainer.global_batch_size", cfg["trainer"]["global_batch_size"],
                        cfg["data"]["synthetic_size"] if cfg["data"]["source"] == "synthetic" else size))
    for student in exp.distill_runs.values():
        cfg = exp.stage_config("distill", student)
        batches.append((f"distill run {student.name}", "distill.global_batch_size", cfg["distill"]["global_batch_size"],
                        cfg["data"]["synthetic_size"] if cfg["data"]["source"] == "synthetic" else size))
    for job, key, batch, available in batches:
        if batch > available:
            found.append(f"{job}: config key '{key}': a batch of {batch} is larger than the {available} images it is drawn "
                         f"from (the dataset has {size} image files); lower it to at most {available}")
    return found


def _guidance_without_a_null_class(exp: Experiment) -> list[str]:
    """Classifier-free guidance needs the null-class row of the label embedding, which a DiT has only when it is
    trained with label dropout (model.class_dropout_prob > 0)."""
    found = []
    for e in exp.evaluations():
        if e.run.kind == "train" and sampler_label(e.sampler).cfg_scale != 1.0:
            model = exp.stage_config("train", e.run)["model"]
            if model["class_dropout_prob"] == 0:
                found.append(f"sampler {e.sampler!r} of {e.run.name}: guidance needs a null class, and the method "
                             f"{e.run.method.name!r} trains without label dropout (model.class_dropout_prob is 0): sample "
                             f"it without -cfg, or train it with label dropout")
    for student in exp.distill_runs.values():
        if student.teacher is None:
            continue  # no teacher to guide
        scale = exp.stage_config("distill", student)["distill"]["cfg_scale"]
        model = exp.stage_config("train", student.teacher)["model"]
        if scale != 1.0 and model["class_dropout_prob"] == 0:
            found.append(f"distill run {student.name}: config key 'distill.cfg_scale' is {scale}, but guidance needs a "
                         f"null class and the teacher trains without label dropout (model.class_dropout_prob is 0): set "
                         f"distill.cfg_scale=1.0")
    return sorted(set(found))


def _students_without_a_teacher(exp: Experiment) -> list[str]:
    """A teacher_free method must evaluate no teacher network, a student that drops labels needs base_config's DiT to
    have a null class, the DiT's model.init_from must exist, and the method's objective must accept the settings
    without a teacher (speedpipe.stages.distill refuses each too, but only when its job starts)."""
    from speedpipe.consistency.methods import consistency_method

    found = []
    for student in exp.distill_runs.values():
        if student.teacher is not None:
            continue
        method, cfg = consistency_method(student.method), exp.stage_config("distill", student)
        d, init_from = OmegaConf.create(cfg["distill"]), cfg["model"]["init_from"]
        if method.teacher_velocity:
            found.append(f"teacher_free: {student.method} evaluates the teacher network; only a method that evaluates "
                         f"none trains without a teacher (name a teacher in `teachers` instead)")
            continue
        if method.dropped_labels(d) and cfg["model"]["class_dropout_prob"] == 0:
            found.append(f"distill run {student.name}: {student.method} drops labels to the null class, and base_config's "
                         f"DiT has none (model.class_dropout_prob is 0): set it above 0 in overrides.distill")
        if init_from and not Path(init_from).is_file():
            found.append(f"distill run {student.name}: config key 'model.init_from': {init_from} does not exist")
        try:
            method.objective(None, d)  # what its objective refuses without a teacher (MeanFlow: guidance without a null class)
        except ConfigError as err:
            found.append(f"distill run {student.name}: {err}")
    return found
