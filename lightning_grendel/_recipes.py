"""The YAML recipes shipped inside the package, found by name so a wheel install can run them.

A recipe's name is its path under ``lightning_grendel/recipes`` without ``.yaml`` (``gaussian/demo``);
``lightning-grendel fit -c gaussian/demo`` runs it, and ``lightning-grendel recipes`` lists them.
"""

from __future__ import annotations

import difflib
import re
from importlib.resources import files
from pathlib import Path

RECIPES_ROOT = Path(str(files("lightning_grendel") / "recipes"))
_SENTENCE_END = re.compile(r"(?<!\.)\.(?=\s|$)")


class RecipeNotFoundError(ValueError):
    """``-c``/``--config`` names neither a file nor a shipped recipe; the message suggests the closest."""


def recipe_names() -> list[str]:
    """Every shipped recipe's name, sorted."""
    return sorted(str(path.relative_to(RECIPES_ROOT).with_suffix("")) for path in RECIPES_ROOT.rglob("*.yaml"))


def _first_sentence(text: str) -> str:
    """``text`` up to the first full stop outside parentheses (all of it when there is none)."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth <= 0 and _SENTENCE_END.match(text, index):
            return text[: index + 1]
    return text


def recipe_summary(name: str) -> str:
    """The first sentence of a recipe's leading comment (what it trains), or an empty string."""
    words = []
    for line in (RECIPES_ROOT / f"{name}.yaml").read_text().splitlines():
        text = line.lstrip("# ").strip()
        if not line.startswith("#") or not text or text.startswith("lightning-grendel "):
            break
        words.append(text)
    return _first_sentence(" ".join(words))


def suggest_recipes(value: str, count: int = 3) -> list[str]:
    """The shipped recipes whose names are closest to ``value`` (best first, near-ties only)."""
    system, _, stem = value.rpartition("/")
    names = [name for name in recipe_names() if not system or name.startswith(f"{system}/")] or recipe_names()
    scores = {name: difflib.SequenceMatcher(None, stem, name.rsplit("/", 1)[-1]).ratio() for name in names}
    best = max(scores.values())
    close = [name for name in sorted(scores, key=scores.get, reverse=True) if scores[name] >= max(0.6, best - 0.15)]
    return close[:count]


def resolve_config(value: str, flag: str = "-c") -> str:
    """``value`` itself when it is a file, else the shipped recipe's path.

    Raises:
        RecipeNotFoundError: ``value`` is neither, naming the closest shipped recipes.
    """
    if Path(value).is_file() or any(char in value for char in "{:\n"):  # a file, or YAML given inline
        return value
    name = value.removesuffix(".yaml").removeprefix("recipes/")
    candidate = RECIPES_ROOT / f"{name}.yaml"
    if candidate.is_file():
        return str(candidate)
    close = suggest_recipes(name)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise RecipeNotFoundError(f"{flag} {value}: no such file or shipped recipe; {hint}"
                              "`lightning-grendel recipes` lists the recipes")


def resolve_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with every ``-c``/``--config`` value that names a shipped recipe resolved."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in ("-c", "--config") and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config(resolved[i + 1], arg)
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg.split("=", 1)[1], "--config")
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
