"""Gaussian parameters: raw (pre-activation) tensors, their activations, and initialisation from points.

The raw layout is the 3DGS one (means, log-scales, wxyz quaternions, opacity logits, SH DC and rest), so
PLY files and optimiser learning rates carry over from the reference implementation unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor, nn

from lightning_grendel.splatting.sh import num_sh_bases, rgb_to_sh0

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")
INITIAL_OPACITY = 0.1


def mean_neighbour_scale(points: Tensor, neighbours: int = 3) -> Tensor:
    """sqrt of the mean squared distance to the nearest ``neighbours`` points (3DGS's initial scale)."""
    data = points.detach().cpu().double().numpy()
    if len(data) <= 1:
        return torch.full((len(data),), 0.01, dtype=points.dtype)
    k = min(neighbours + 1, len(data))
    distances, _ = cKDTree(data).query(data, k=k)
    mean_sq = np.maximum((distances[:, 1:] ** 2).mean(axis=1), 1e-14)
    return torch.from_numpy(np.sqrt(mean_sq)).to(points.dtype)


def init_from_points(points: Tensor, colors: Tensor, sh_degree: int = 3) -> dict[str, Tensor]:
    """Raw parameters for Gaussians centred at ``points`` with base colour ``colors`` (in [0, 1])."""
    if points.dim() != 2 or points.shape[1] != 3 or colors.shape != points.shape:
        raise ValueError(f"points and colors must both be [N, 3], got {tuple(points.shape)}, {tuple(colors.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("initial points contain NaN or infinite coordinates")
    n = points.shape[0]
    points = points.to(torch.float32)
    scale = mean_neighbour_scale(points)
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    opacity_logit = torch.logit(torch.tensor(INITIAL_OPACITY))
    return {
        "means": points.clone(),
        "scales": scale.log()[:, None].repeat(1, 3),
        "quats": quats,
        "opacities": torch.full((n,), float(opacity_logit)),
        "sh0": rgb_to_sh0(colors.to(torch.float32))[:, None, :],
        "shN": torch.zeros(n, num_sh_bases(sh_degree) - 1, 3),
    }


def make_parameters(raw: dict[str, Tensor]) -> nn.ParameterDict:
    """Trainable ``ParameterDict`` over raw tensors, in the canonical key order."""
    missing = set(PARAM_KEYS) - set(raw)
    if missing:
        raise KeyError(f"Gaussian parameters are missing {sorted(missing)}")
    return nn.ParameterDict({key: nn.Parameter(raw[key].contiguous()) for key in PARAM_KEYS})


def activated_scales(params: dict[str, Tensor]) -> Tensor:
    return params["scales"].exp()


def activated_opacities(params: dict[str, Tensor]) -> Tensor:
    return torch.sigmoid(params["opacities"])


def sh_coefficients(params: dict[str, Tensor]) -> Tensor:
    """All SH coefficients [N, K, 3], DC first."""
    return torch.cat([params["sh0"], params["shN"]], dim=1)
