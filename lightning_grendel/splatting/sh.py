"""Real spherical harmonics up to degree 3 with the constants of Inria's 3DGS, so colours match the field."""

from __future__ import annotations

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_bases(degree: int, directions: Tensor) -> Tensor:
    """SH basis values [..., (degree+1)^2] at unit ``directions`` [..., 3]."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    x, y, z = directions.unbind(-1)
    bases = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        bases += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        bases += [
            SH_C2[0] * xy,
            SH_C2[1] * yz,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * xz,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        bases += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * xy * z,
            SH_C3[2] * y * (4.0 * zz - xx - yy),
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * (4.0 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(bases, dim=-1)


def sh_to_rgb(degree: int, coefficients: Tensor, directions: Tensor) -> Tensor:
    """View-dependent colour: ``max(sum_k b_k(d) c_k + 0.5, 0)``.

    ``coefficients`` is [..., K, 3] with K >= (degree+1)^2 (extra bands are ignored, which is how the
    degree rises during training); ``directions`` [..., 3] need not be normalised.
    """
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    count = num_sh_bases(degree)
    bases = sh_bases(degree, directions)
    rgb = (bases[..., None] * coefficients[..., :count, :]).sum(dim=-2)
    return (rgb + 0.5).clamp_min(0.0)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """Degree-0 coefficient whose colour is ``rgb``."""
    return (rgb - 0.5) / SH_C0
