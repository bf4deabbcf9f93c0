"""The few lines a finished ``fit`` prints: what was trained, how long it took, and where the outputs are."""

from __future__ import annotations

from pathlib import Path


def fit_summary(
    owner: str, gaussians: int, ranks: int, seconds: float, steps: int, images: int, val_psnr: float | None,
    log_dir: str | None, checkpoint: str | None, ply: Path | None,
) -> str:
    """One block: Gaussians, steps and images, wall time, the last validation PSNR, then one line per output."""
    where = f" on {ranks} ranks" if ranks > 1 else ""
    psnr = f", val/psnr {val_psnr:.2f} dB (last validation)" if val_psnr is not None else ", not validated"
    lines = [f"{owner} fit done{where} in {seconds:.1f} s: {gaussians:,} Gaussians after {steps} steps "
             f"({images} images){psnr}"]
    for name, path in (("logs", log_dir), ("checkpoint", checkpoint), ("point cloud", ply)):
        lines.append(f"  {name + ':':<13}{path if path else '(none)'}")
    return "\n".join(lines)
