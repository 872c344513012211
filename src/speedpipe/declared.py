"""What the plug-ins declare, read from their modules' source without importing them: the config schema
(speedpipe.config_schema) takes its keys from here, and planning a workflow imports no torch.

- A timestep sampler or loss weighting (speedpipe.diffusion.timesteps, and one module each in
  diffusion/timestep_methods/) is registered in a dict literal, SAMPLERS = {"name": Class} or
  WEIGHTINGS = {"name": function}, of classes and functions its module defines; its parameters are those of its
  function or its class's __init__ after `diffusion`, with their annotations (float, int, bool, str; any other, or two
  methods that disagree: any value). They are the keys of diffusion.timestep_sampler / diffusion.loss_weighting.
- A consistency method (a module of speedpipe.consistency.methods) with hyper-parameters of its own declares them in a
  dict literal SETTINGS = {"key": default}: the section distill.{method}, typed by the defaults.
- An image source (a module of speedpipe.data.sources, named as data.name selects it) declares its own settings the
  same way: the section data.{source}.
- A stage of one's own (a module of speedpipe.stages) declares its registry entry, STAGE = {"version": 1, "reads":
  [...], ...} (the fields of speedpipe.stages.Stage), and its settings, the config section {stage}.
"""
import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DIFFUSION = PACKAGE / "diffusion"
METHODS = PACKAGE / "consistency" / "methods"
SOURCES = PACKAGE / "data" / "sources"
STAGES = PACKAGE / "stages"
STAGE_FIELDS = {"phase", "version", "reads", "uses", "given", "ranks"}  # what a stage's STAGE literal may set
TYPES = {"float": float, "int": int, "bool": bool, "str": str}


def modules(folder: Path) -> list[str]:
    """The module names of a plug-in folder (a name starting with '_' is a helper, not a plug-in)."""
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))


def timestep_modules() -> list[str]:
    """The modules of speedpipe.diffusion.timestep_methods."""
    return modules(DIFFUSION / "timestep_methods")


def timestep_parameters(registry: str) -> dict[str, type | None]:
    """parameter -> its type (None: any) over the methods of every module's `registry` dict (SAMPLERS or WEIGHTINGS),
    the built-in module's first."""
    params = {}
    for path in [DIFFUSION / "timesteps.py", *(DIFFUSION / "timestep_methods" / f"{m}.py" for m in timestep_modules())]:
        tree = _parsed(path)
        defined = {node.name: node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        registered = _assigned(tree, registry)
        if registered is not None and not isinstance(registered, ast.Dict):
            raise TypeError(f"{path}: {registry} must be a dict literal {{name: class or function}}")
        for method in registered.values if registered is not None else []:
            for param, annotation in _parameters(defined.get(getattr(method, "id", None)), path, registry):
                kind = TYPES.get(getattr(annotation, "id", None))
                if params.setdefault(param, kind) != kind:
                    params[param] = None
    return params


def method_settings() -> dict[str, dict]:
    """method -> its SETTINGS (key -> default) for every consistency method that declares them."""
    return settings_of(METHODS)


def source_settings() -> dict[str, dict]:
    """image source -> its SETTINGS for every module of speedpipe.data.sources (an empty dict if it declares none)."""
    declared = settings_of(SOURCES)
    return {name: declared.get(name, {}) for name in modules(SOURCES)}


def stage_declarations() -> dict[str, dict]:
    """stage -> its STAGE literal (the registry entry's fields), for the modules of speedpipe.stages that declare one."""
    declared = _literals(STAGES, "STAGE")
    for name, entry in declared.items():
        if not set(entry) <= STAGE_FIELDS or "version" not in entry:
            raise TypeError(f"{STAGES / name}.py: STAGE must set version and may set only {sorted(STAGE_FIELDS)}")
    return declared


def settings_of(folder: Path) -> dict[str, dict]:
    """module -> its SETTINGS dict literal (key -> default), for the modules of a plug-in folder that declare one."""
    settings = _literals(folder, "SETTINGS")
    for name, values in settings.items():
        if not all(_plain_default(v) for v in values.values()):
            raise TypeError(f"{folder / name}.py: SETTINGS must be a dict literal {{key: default}}, each default a number, "
                            f"bool, string, None or a list of them")
    return settings


@functools.lru_cache(maxsize=None)
def _literals(folder: Path, variable: str) -> dict[str, dict]:
    """module -> the dict literal it assigns to `variable` (identifier keys), for the modules of a folder that do."""
    found = {}
    for name in modules(folder):
        declared = _assigned(_parsed(folder / f"{name}.py"), variable)
        if declared is None:
            continue
        try:
            values = ast.literal_eval(declared)
        except ValueError:
            values = None
        if not isinstance(values, dict) or not all(isinstance(k, str) and k.isidentifier() for k in values):
            raise TypeError(f"{folder / name}.py: {variable} must be a dict literal with identifier keys")
        found[name] = values
    return found


def _plain_default(value) -> bool:
    scalar = lambda v: v is None or isinstance(v, (bool, int, float, str))  # noqa: E731
    return scalar(value) or isinstance(value, list) and all(map(scalar, value))


def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _assigned(tree: ast.Module, name: str) -> ast.expr | None:
    """The value a module assigns to a name at its top level (None if it does not)."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if [getattr(t, "id", None) for t in targets] == [name] and node.value is not None:
            return node.value
    return None


def _parameters(method, path: Path, registry: str) -> list[tuple[str, ast.expr | None]]:
    """(name, annotation) of a method's parameters after `diffusion`."""
    if isinstance(method, ast.ClassDef):
        init = next((n for n in method.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        args = init and init.args.args[1:] + init.args.kwonlyargs
    else:
        args = isinstance(method, ast.FunctionDef) and method.args.args + method.args.kwonlyargs
    if not args or args[0].arg != "diffusion":
        raise TypeError(f"{path}: every {registry} entry must be a class (with its own __init__) or a function defined in "
                        f"the module, whose first parameter is `diffusion`")
    return [(a.arg, a.annotation) for a in args[1:]]
