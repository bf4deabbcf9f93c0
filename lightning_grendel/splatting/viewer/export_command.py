"""``lightning-grendel export``: a trained scene as a file web viewers and other 3DGS tools open.

The source is a checkpoint file, a GrendelStrategy checkpoint directory (every shard) or a Gaussian file
(standard or compressed PLY, SPZ, ``.splat``), so the command also converts between formats. The file
is written under a temporary name and renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_grendel.splatting.formats.common import GaussianFileError
from lightning_grendel.splatting.formats.io import EXTENSIONS, FORMATS, write_gaussians
from lightning_grendel.splatting.formats.spz import WRITABLE_VERSIONS, write_spz
from lightning_grendel.splatting.viewer.scene_source import SceneSourceError, load_scene


class ExportError(ValueError):
    """Bad input to ``export``; the message names the file or flag."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-grendel export",
        description="Write a trained Gaussian scene as a standard PLY (lossless; Inria's layout), SPZ "
        "(Niantic's, about 10x smaller), .splat (antimatter15's, no view-dependent colour) or compressed PLY "
        "(PlayCanvas/SuperSplat's). Quantisation of each format: docs/3dgs.md, 'Exporting'.",
    )
    parser.add_argument("source", type=Path, help="checkpoint file, GrendelStrategy checkpoint directory "
                        "(meta.pt + shard_*.pt), or a PLY / compressed PLY / SPZ / .splat file")
    parser.add_argument("--out", type=Path, required=True, help="file to write (must not exist unless --overwrite)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: from --out's extension: "
                        + ", ".join(f"{ext} -> {name}" for name, ext in EXTENSIONS.items()) + ")")
    parser.add_argument("--spz-version", type=int, choices=WRITABLE_VERSIONS, default=3,
                        help="SPZ version to write: 3 (gzip; what SPZ readers open), 4 (zstd streams; newer readers "
                        "only) or 2 (legacy, coarser rotations)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def format_of(out: Path) -> str | None:
    """The format an output name implies (``.compressed.ply`` before ``.ply``); None for other names."""
    name = out.name.lower()
    for format in sorted(EXTENSIONS, key=lambda f: -len(EXTENSIONS[f])):
        if name.endswith(EXTENSIONS[format]):
            return format
    return None


def resolve_format(out: Path, requested: str | None) -> str:
    implied = format_of(out)
    if requested is None:
        if implied is None:
            raise ExportError(f"--out {out}: cannot tell the format from the name; give --format "
                              f"({', '.join(FORMATS)}) or end it in {', '.join(EXTENSIONS.values())}")
        return implied
    if implied is not None and implied != requested:
        raise ExportError(f"--out {out}: the name says {implied} but --format is {requested}; name it "
                          f"*{EXTENSIONS[requested]} (viewers pick their reader by extension)")
    return requested


def run(args: argparse.Namespace) -> str:
    """Export and return a one-line summary."""
    format = resolve_format(args.out, args.format)
    if args.out.is_dir():
        raise ExportError(f"--out {args.out}: is a directory; give a file name")
    if args.out.exists() and not args.overwrite:
        raise ExportError(f"--out {args.out}: already exists (pass --overwrite to replace it)")
    try:
        scene = load_scene(args.source)
    except SceneSourceError as error:
        raise ExportError(f"source {error}") from error
    params = scene.params
    try:
        if format == "spz":
            write_spz(args.out, params, version=args.spz_version, antialiased=scene.antialiased)
        else:
            write_gaussians(args.out, params, format)
    except OSError as error:
        raise ExportError(f"--out {args.out}: cannot write there: {error.strerror or error}") from error
    degree = round((params["shN"].shape[1] + 1) ** 0.5) - 1
    size = args.out.stat().st_size
    return f"wrote {args.out} ({format}, {params['means'].shape[0]} Gaussians, SH degree {degree}, {size} bytes)"


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except (ExportError, GaussianFileError) as error:
        parser.error(str(error))
    print(summary)
