"""A stage's output shape and dtype without computing it, as the real forward would give them.

Receivers plan a transfer before the tensor exists, so every rank infers each stage's output from a
copy of the stage on the meta device. Autocast dispatches on the device, and meta tensors have none it
knows: under ``torch.autocast`` a meta forward keeps float32 where the real one gives bfloat16. Under
autocast the copy therefore runs on fake tensors of the real device type, which autocast does see.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._pytree import tree_map_only


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """What changes a forward's dtypes on ``device_type``: whether autocast is on there, and to which dtype."""
    if not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


def meta_forward(module: nn.Module, args: Any, device: torch.device) -> Any:
    """``module(*args)`` on meta tensors (``module`` and ``args`` on the meta device, any pytree of tensors).

    Returns the output pytree on the meta device with the shapes and dtypes the forward on ``device``
    gives under the caller's autocast and default dtype.
    """
    args = args if isinstance(args, tuple) else (args,)
    if not autocast_state(device.type)[0]:
        with torch.no_grad():
            return module(*args)
    tensors = {name: (t.shape, t.dtype) for name, t in itertools.chain(module.named_parameters(),
                                                                      module.named_buffers())}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():  # tensors kept as plain attributes
        fake = {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in tensors.items()}
        fake_args = tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), args)
        out = functional_call(module, fake, fake_args)
    return tree_map_only(torch.Tensor, _to_meta, out)  # outside the mode: plain meta tensors
