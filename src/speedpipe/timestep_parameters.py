"""The parameters of every timestep sampler and loss weighting, read from their modules' source without importing them:
the config's diffusion.timestep_sampler and diffusion.loss_weighting sections take exactly these keys
(speedpipe.config_schema), and planning a workflow imports no torch.

A module registers its methods in a dict literal, SAMPLERS = {"name": Class} or WEIGHTINGS = {"name": function}, of
classes and functions it defines; a method's parameters are those of its function or its class's __init__ after
`diffusion`, with their annotations (float, int, bool, str; any other, or two methods that disagree: any value)."""
import ast
from pathlib import Path

DIFFUSION = Path(__file__).resolve().parent / "diffusion"
TYPES = {"float": float, "int": int, "bool": bool, "str": str}


def plugin_modules() -> list[str]:
    """The module names of speedpipe.diffusion.timestep_methods (a name starting with '_' is not a method's)."""
    return sorted(p.stem for p in (DIFFUSION / "timestep_methods").glob("*.py") if not p.name.startswith("_"))


def declared_parameters(registry: str) -> dict[str, type | None]:
    """parameter -> its type (None: any) over the methods of every module's `registry` dict (SAMPLERS or WEIGHTINGS),
    the built-in module's first."""
    params = {}
    for path in [DIFFUSION / "timesteps.py", *(DIFFUSION / "timestep_methods" / f"{m}.py" for m in plugin_modules())]:
        tree = ast.parse(path.read_text(), str(path))
        defined = {node.name: node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [registry]:
                if not isinstance(node.value, ast.Dict):
                    raise TypeError(f"{path}: {registry} must be a dict literal {{name: class or function}}")
                for method in node.value.values:
                    for param, annotation in _parameters(defined.get(getattr(method, "id", None)), path, registry):
                        kind = TYPES.get(getattr(annotation, "id", None))
                        if params.setdefault(param, kind) != kind:
                            params[param] = None
    return params


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
