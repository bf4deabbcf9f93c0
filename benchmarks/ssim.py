"""Forward + backward time of the 3DGS L1 + D-SSIM loss: the fused C++ kernel against the PyTorch path.

Both run in one process, alternating (fused, torch, fused, torch, ...) so a loaded machine slows both
alike; each reported time is the median over the repeats of one loss + backward call on a float32
[H, W, 3] image against a correlated target (the shape of a training step's loss).

    python benchmarks/ssim.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_grendel.splatting.fused_ssim import load_extension
from lightning_grendel.splatting.losses import image_loss, torch_strip_loss

SIZES = [(400, 400), (480, 360)]  # (width, height)


def inputs(width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 image that requires grad and its target, correlated like a half-trained render."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(height, width, 3, generator=g)
    image = (0.8 * target + 0.2 * torch.rand(height, width, 3, generator=g)).requires_grad_()
    return image, target


def fused(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return image_loss(image, target)


def reference(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch_strip_loss(image, target, 0, image.shape[0], image.numel())


def seconds(loss_fn, image: torch.Tensor, target: torch.Tensor) -> float:
    """Wall time of one loss + backward."""
    image.grad = None
    start = time.perf_counter()
    loss_fn(image, target).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per path and size (after 2 warm-ups)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    if load_extension() is None:
        parser.error("the fused SSIM extension did not build (see the warning above): nothing to compare")
    torch.set_num_threads(args.threads)
    results = []
    for width, height in SIZES:
        image, target = inputs(width, height)
        for _ in range(2):  # warm-up: first-touch allocations and the window caches
            for loss_fn in (fused, reference):
                seconds(loss_fn, image, target)
        times: dict[str, list[float]] = {"fused": [], "torch": []}
        for _ in range(args.repeats):
            times["fused"].append(seconds(fused, image, target))
            times["torch"].append(seconds(reference, image, target))
        results.append((f"{width}x{height}", statistics.median(times["fused"]), statistics.median(times["torch"])))
    print(f"threads={args.threads} repeats={args.repeats} float32 loss + backward, median ms")
    print(f"{'size':>9} {'fused':>9} {'torch':>9} {'speedup':>8}")
    for size, fused_s, torch_s in results:
        print(f"{size:>9} {fused_s * 1e3:9.2f} {torch_s * 1e3:9.2f} {torch_s / fused_s:8.2f}")
    for size, fused_s, torch_s in results:
        print(f"RESULT ssim.fused_vs_torch_fwd_bwd_{size}={torch_s / fused_s:.2f}")
        print(f"RESULT ssim.fused_fwd_bwd_ms_{size}={fused_s * 1e3:.2f}")
        print(f"RESULT ssim.torch_fwd_bwd_ms_{size}={torch_s * 1e3:.2f}")


if __name__ == "__main__":
    main()
