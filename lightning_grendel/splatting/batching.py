"""Adam hyperparameters for batched multi-view training (Grendel's rule).

With b views per step and gradients averaged over them, independent per-view gradients make one batched
Adam step about 1/sqrt(b) of b single-view steps, so the learning rate is scaled by sqrt(b) and eps by
1/sqrt(b); beta**b keeps the moment EMAs' horizon fixed in *images* rather than steps. gsplat's
``1 - b(1 - beta)`` is a first-order version of beta**b that turns negative for large b, so it is not used.
"""

from __future__ import annotations

import math
from typing import Literal

BatchScaling = Literal["sqrt", "linear", "none"]


def scale_adam_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, batch_size: int, mode: BatchScaling = "sqrt"
) -> tuple[float, tuple[float, float], float]:
    """(lr, betas, eps) for ``batch_size`` views per step under ``mode``.

    ``sqrt``: lr*sqrt(b), eps/sqrt(b), beta**b. ``linear``: lr*b, eps/b, beta**b. ``none``: unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode == "none":
        return lr, betas, eps
    if mode == "sqrt":
        factor = math.sqrt(batch_size)
    elif mode == "linear":
        factor = float(batch_size)
    else:
        raise ValueError(f"unknown batch scaling mode {mode!r}; choose sqrt, linear or none")
    return lr * factor, (betas[0] ** batch_size, betas[1] ** batch_size), eps / factor
