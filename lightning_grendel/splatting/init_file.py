"""Initial Gaussians read from a scene file (``GaussianSplattingModule(init_ply=...)``) instead of SfM points.

Any file :func:`~lightning_grendel.splatting.formats.io.read_gaussians` reads: a standard or compressed 3DGS
PLY (Inria's, gsplat's, SuperSplat's, this project's export), SPZ or ``.splat``. Its SH degree is fitted to
the module's: a lower one gets zero higher bands, which is what training from SfM points starts with too
(gsplat and nerfstudio zero-initialise them the same way); a higher one is refused, since dropping bands
changes every view-dependent colour. Every error names ``init_ply`` and the file.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_grendel.splatting.formats.common import GaussianFileError, sh_degree_of_rest
from lightning_grendel.splatting.formats.io import read_gaussians


def gaussians_from_file(path: str | os.PathLike, sh_degree: int, who: str) -> tuple[dict[str, Tensor], int]:
    """All Gaussians of ``path`` as raw float32 CPU parameters with ``sh_degree`` bands, and the file's degree.

    Args:
        path: the scene file (the ``init_ply`` argument).
        sh_degree: the module's SH degree; a file of a lower degree is padded with zero bands.
        who: the class name that starts error messages.
    """
    flag = f"{who}(init_ply={str(path)!r})"
    try:
        params = read_gaussians(path)
    except GaussianFileError as error:
        raise GaussianFileError(f"{flag}: cannot initialise from it: {error}") from error
    count = params["means"].shape[0]
    if count == 0:
        raise GaussianFileError(f"{flag}: {path} holds no Gaussians")
    degree = sh_degree_of_rest(params["shN"].shape[1])
    assert degree is not None  # the readers check the layout
    if degree > sh_degree:
        raise GaussianFileError(
            f"{flag}: {path} has SH degree {degree}, higher than the module's sh_degree={sh_degree}; set "
            f"--model.sh_degree {degree} (dropping bands would change every view-dependent colour)"
        )
    padding = ""
    if degree < sh_degree:
        padded = torch.zeros(count, (sh_degree + 1) ** 2 - 1, 3, dtype=params["shN"].dtype)
        padded[:, : params["shN"].shape[1]] = params["shN"]
        params["shN"] = padded
        padding = f"; SH bands {degree + 1}-{sh_degree} start at zero (sh_degree={sh_degree})"
    rank_zero_info(f"init_ply {path}: {count} Gaussians of SH degree {degree}{padding}")
    return params, degree
