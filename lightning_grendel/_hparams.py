"""Rebuild a module or data module from a checkpoint's saved hyperparameters, as ``fit`` built it.

A checkpoint that ``lightning-grendel fit`` (LightningCLI) wrote stores the parsed configuration, not
the objects: ``densify`` is a mapping of ``DensifyConfig`` or ``MCMCConfig`` fields, the class a
``_class_path``. jsonargparse turns them back into objects, as Lightning's ``load_from_checkpoint``
does (``lightning.pytorch.cli.instantiate_module``), with the same rule against importing code a
checkpoint names: its class must already be imported.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, TypeVar

from lightning.pytorch.cli import instantiate_module

T = TypeVar("T")
_INSTANTIATORS = {"lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module"}


def _imported_class(class_path: str, base: type) -> type | None:
    module, _, name = class_path.rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, base) else None


def instantiate_from_hparams(base: type[T], hparams: dict[str, Any], source: str, **overrides: Any) -> T:
    """``base`` (or the saved subclass of it) built from ``hparams`` with ``overrides`` on top.

    Args:
        base: the class the object must be (``GaussianSplattingModule``, ...).
        hparams: a checkpoint's ``hyper_parameters`` (or ``datamodule_hyper_parameters``).
        source: what the hyperparameters came from, for error messages (the checkpoint's path).
        overrides: values that replace saved ones (``backend="torch"``).
    """
    values = {**hparams, **overrides}
    instantiator = values.pop("_instantiator", None)
    class_path = values.pop("_class_path", None)
    if instantiator is not None and instantiator not in _INSTANTIATORS:
        raise ValueError(f"{source}: hyperparameters name an unknown instantiator {instantiator!r}")
    cls = base if class_path is None else _imported_class(class_path, base)
    if cls is None:
        raise ValueError(f"{source}: saved for {class_path}, which is not an imported subclass of {base.__name__} "
                         "(import the module that defines it first)")
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        values = {key: value for key, value in values.items() if key in accepted}
    if cls is base:
        return instantiate_module(base, values)
    return instantiate_module(base, {"_class_path": f"{cls.__module__}.{cls.__qualname__}", **values})
