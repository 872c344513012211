"""What Snakemake's planning remembers, per process and on disk under .snakemake/: each stage config validated (so a
no-op re-run imports no torch) and the content fingerprint of each user input a job reads (photos, weights files)."""
import functools
import json
from pathlib import Path

from speedpipe import config
from speedpipe.stages import with_contents


file_values = functools.lru_cache(maxsize=None)(config.file_values)


def with_content_fingerprints(params: dict, config: dict) -> dict:
    """A stage run's params with the user inputs it reads as their contents (speedpipe.stages.with_contents): an edit of
    the data re-runs the jobs that read it, moving it elsewhere re-runs none."""
    def fingerprint(path):
        st = Path(path).stat()
        return content_fingerprint_of(path, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), Path.cwd() / ".snakemake")

    return {**params, "reads": with_contents(params["reads"], config, fingerprint)}


@functools.lru_cache(maxsize=None)
def content_fingerprint_of(path: str, stamp: tuple, snakemake_dir: Path) -> str:
    """content_fingerprint of a path, once per process and stat of the path itself (every job of a Snakemake invocation
    that reads the photos or a weights file asks for it), remembered under .snakemake/ when there is one."""
    from speedpipe.fingerprint import content_fingerprint

    return content_fingerprint(path, snakemake_dir / "speedpipe-fingerprints" if snakemake_dir.is_dir() else None)


@functools.lru_cache(maxsize=None)
def source_digest(package: Path = Path(__file__).resolve().parent) -> str:
    """The content of every module of the package: validation builds samplers, weightings, the DiT and the consistency
    methods from the config, so an edit of any of them can change what is valid."""
    import hashlib

    digest = hashlib.sha256()
    for module in sorted(package.rglob("*.py")):
        digest.update(str(module.relative_to(package)).encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def validated(path: str, overrides: tuple, phase: str | None) -> str:
    """load_config, remembered on disk by the content of the config files it reads and of speedpipe's modules (a no-op
    re-run of Snakemake then never imports torch to validate, which is most of its start-up time)."""
    import hashlib

    files = [*config.base_chain(Path(path)), Path(path)]
    key = hashlib.sha256(json.dumps([[str(f), f.read_text()] for f in files]
                                    + [list(overrides), phase, source_digest()]).encode()).hexdigest()
    cached = Path(".snakemake") / "speedpipe-configs" / f"{key}.json"
    if cached.is_file():
        return cached.read_text()
    text = json.dumps(config.to_plain(config.load_config(path, list(overrides), phase=phase)))
    if Path(".snakemake").is_dir():
        from speedpipe.io import atomic_write_text

        atomic_write_text(cached, text)
    return text
