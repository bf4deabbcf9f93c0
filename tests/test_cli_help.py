"""Every option the CLI exposes is described: ``--model.help <Class>`` shows a line for each parameter."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import docstring_parser
import pytest

import lightning_grendel
from lightning_grendel._recipes import RECIPES_ROOT

_IGNORED = {"self", "args", "kwargs", "accelerator", "parallel_devices", "cluster_environment", "checkpoint_io",
            "precision_plugin"}  # Lightning fills these in itself


def _exposed_classes() -> list[type]:
    """Classes the recipes name, the short paths of the package, and the config classes they take."""
    paths = {f"lightning_grendel.{name}" for name in lightning_grendel._SHORT_PATHS}
    for recipe in RECIPES_ROOT.rglob("*.yaml"):
        paths |= {line.split("class_path:")[1].split("#")[0].strip() for line in recipe.read_text().splitlines()
                  if "class_path: lightning_grendel" in line}
    classes = []
    for path in sorted(paths):
        module, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    for cls in list(classes):
        for parameter in inspect.signature(cls.__init__).parameters.values():
            annotation = parameter.annotation
            for candidate in vars(importlib.import_module(cls.__module__)).values():
                if (dataclasses.is_dataclass(candidate) and isinstance(candidate, type)
                        and candidate.__name__ in str(annotation) and candidate not in classes):
                    classes.append(candidate)
    return classes


@pytest.mark.parametrize("cls", _exposed_classes(), ids=lambda cls: cls.__name__)
def test_every_parameter_has_an_args_entry(cls):
    documented = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("lightning_grendel") and klass.__doc__:
            documented |= {p.arg_name for p in docstring_parser.parse(klass.__doc__).params}
    parameters = [name for name in inspect.signature(cls.__init__).parameters if name not in _IGNORED]
    missing = [name for name in parameters if name not in documented]
    assert not missing, f"{cls.__module__}.{cls.__name__}: no Args: entry for {missing}"
