"""The YAML recipes shipped inside the package, found by name so a wheel install can run them.

A recipe's name is its path under ``lightning_grendel/recipes`` without ``.yaml`` (``gaussian/demo``);
``lightning-grendel fit -c gaussian/demo`` runs it, and ``lightning-grendel recipes`` lists them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

RECIPES_ROOT = Path(str(files("lightning_grendel") / "recipes"))


def recipe_names() -> list[str]:
    """Every shipped recipe's name, sorted."""
    return sorted(str(path.relative_to(RECIPES_ROOT).with_suffix("")) for path in RECIPES_ROOT.rglob("*.yaml"))


def recipe_summary(name: str) -> str:
    """The first comment line of a recipe (what it trains), or an empty string."""
    for line in (RECIPES_ROOT / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config(value: str) -> str:
    """``value`` itself when it is a file (or not a recipe name), else the shipped recipe's path."""
    if Path(value).is_file():
        return value
    name = value.removesuffix(".yaml").removeprefix("recipes/")
    candidate = RECIPES_ROOT / f"{name}.yaml"
    return str(candidate) if candidate.is_file() else value


def resolve_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with every ``-c``/``--config`` value that names a shipped recipe resolved."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in ("-c", "--config") and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return resolved


def require_data_path(path: str | None, owner: str) -> str:
    """``path`` itself; a clear error naming the command-line flag when a recipe was run without one."""
    if path is None or not str(path).strip():
        raise ValueError(f"{owner} needs its dataset folder: pass --data.path PATH")
    return str(path)


def format_recipe_list() -> str:
    """The text ``lightning-grendel recipes`` prints: one recipe per line with its summary."""
    names = recipe_names()
    width = max(len(name) for name in names)
    lines = [f"{name:<{width}}  {recipe_summary(name)}" for name in names]
    return "\n".join([f"recipes in {RECIPES_ROOT} (run one with: lightning-grendel fit -c NAME):", *lines])
