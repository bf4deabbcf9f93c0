"""The C++ fused EWA projection + SH colour (``csrc/project.cpp``), used by ``render.splat_gaussians`` on the CPU.

The torch ``project_gaussians`` and ``sh_to_rgb`` are many small autograd ops over [C, N, ...] tensors; the
extension does both in one pass per Gaussian, forward and backward, with the same formulas (they stay the
reference, and the fallback when :func:`fused_projection_available` says no). Backward recomputes each
pair's intermediates from the inputs rather than saving them.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.cpp_build import PROJECTION, load_cpp_extension
from lightning_grendel.splatting.projection import Projected, RasterizeMode, check_rasterize_mode

_DTYPES = (torch.float32, torch.float64)


def load_extension() -> ModuleType | None:
    """The compiled extension, or ``None`` if it cannot be built (warned about once per process)."""
    return load_cpp_extension(PROJECTION)


SHBands = tuple[Tensor, Tensor]


def _bands(coefficients: Tensor | SHBands) -> SHBands:
    """``(sh0 [N, 1, 3], shN [N, K - 1, 3])``: the module's parameters as they are, or a joined tensor's slices."""
    if isinstance(coefficients, tuple):
        return coefficients
    return coefficients[:, :1], coefficients[:, 1:]


def fused_projection_available(means: Tensor, quats: Tensor, scales: Tensor, coefficients: Tensor | SHBands,
                               cameras: Cameras) -> bool:
    """Whether the fused op applies: CPU float32/float64 tensors of one dtype, constant cameras, a built extension.

    Args:
        means: Gaussian centres [N, 3].
        quats: quaternions [N, 4].
        scales: activated scales [N, 3].
        coefficients: SH coefficients [N, K, 3], or their bands (see :func:`project_and_shade`).
        cameras: the camera batch; the op gives cameras no gradient, so one that requires grad rules it out.
    """
    tensors = (means, quats, scales, *_bands(coefficients))
    camera_tensors = (cameras.world_to_camera, cameras.intrinsics)
    on_cpu = all(t.device.type == "cpu" for t in tensors + camera_tensors)
    one_dtype = means.dtype in _DTYPES and all(t.dtype == means.dtype for t in tensors)
    constant_cameras = not any(t.requires_grad for t in camera_tensors)
    return on_cpu and one_dtype and constant_cameras and load_extension() is not None


class _FusedProjection(torch.autograd.Function):
    """Forward and backward both call the extension; the inputs are all backward needs.

    The extension takes the SH bands apart (the module's ``sh0`` and ``shN``) and gives their gradients
    apart: a joined [N, 16, 3] copy, saved for backward or made again in it, and a joined gradient split
    into strided views that autograd then copies, were 192 bytes a Gaussian each at SH degree 3
    (benchmarks/gaussian_memory.py).
    """

    @staticmethod
    def forward(ctx, means, quats, scales, sh0, shN, camera_tensors, sizes):
        outputs = load_extension().forward(means, quats, scales, sh0, shN, *camera_tensors, *sizes)
        ctx.save_for_backward(means, quats, scales, sh0, shN)
        ctx.camera_tensors, ctx.sizes = camera_tensors, sizes
        ctx.mark_non_differentiable(outputs[3])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_means2d, grad_conics, grad_depths, _grad_radii, grad_compensations, grad_colors):
        upstream = [None if g is None else g.contiguous()
                    for g in (grad_means2d, grad_conics, grad_depths, grad_compensations, grad_colors)]
        grads = load_extension().backward(*ctx.saved_tensors, *ctx.camera_tensors, *ctx.sizes, *upstream)
        return *grads, None, None


def project_and_shade(
    means: Tensor, quats: Tensor, scales: Tensor, coefficients: Tensor | SHBands, cameras: Cameras, sh_degree: int,
    rasterize_mode: RasterizeMode = "classic",
) -> tuple[Projected, Tensor]:
    """``project_gaussians`` and the SH colours ``sh_to_rgb`` of every (camera, Gaussian) pair, fused.

    Call only where :func:`fused_projection_available` holds.

    Args:
        means: Gaussian centres [N, 3].
        quats: (w, x, y, z) quaternions [N, 4] of any non-zero norm.
        scales: activated scales [N, 3].
        coefficients: SH coefficients [N, K, 3], K >= (sh_degree + 1)^2 (extra bands ignored); or a tuple of
            bands ``(sh0 [N, 1, 3], shN [N, K - 1, 3])`` that concatenate to them along dim 1 (never joined).
        cameras: C pinhole cameras (no gradient flows to them).
        sh_degree: SH degree 0..3 of the colours.
        rasterize_mode: ``"classic"`` or ``"antialiased"`` (which adds ``compensations``).

    Returns:
        The :class:`Projected` splats [C, N, ...] and the colours [C, N, 3].
    """
    check_rasterize_mode(rasterize_mode)
    dtype = means.dtype
    camera_tensors = tuple(
        t.to(dtype).contiguous() for t in (cameras.world_to_camera, cameras.intrinsics, cameras.centers.to(dtype))
    )
    sizes = (cameras.width, cameras.height, sh_degree, rasterize_mode == "antialiased")
    sh0, shN = (band.contiguous() for band in _bands(coefficients))
    means2d, conics, depths, radii, compensations, colors = _FusedProjection.apply(
        means.contiguous(), quats.contiguous(), scales.contiguous(), sh0, shN, camera_tensors, sizes
    )
    compensations = compensations if rasterize_mode == "antialiased" else None
    return Projected(means2d, conics, depths, radii, compensations), colors
