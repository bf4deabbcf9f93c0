"""Niantic's SPZ ("splat zip"): quantised Gaussians about 10x smaller than a PLY, read by most web viewers.

Layout (little-endian), from the public specification (github.com/nianticlabs/spz): a header, then one
array per attribute for all Gaussians: 24-bit fixed-point positions (``fractional_bits`` per file),
8-bit alphas (sigmoid of the opacity), 8-bit colours (``dc * 0.15 + 0.5`` in [0, 1]), 8-bit log scales
(``(log s + 10) * 16``), rotations and 8-bit SH coefficients (``x * 128 + 128``, coefficient-major with
the colour channel inner, rounded to 5 bits for degree 1 and 4 bits above). Versions 1-3 gzip a 16-byte
header and the arrays together; version 4 has a 32-byte plain header, a table of contents and one zstd
stream per array. Rotations: version 2 stores the xyz of the unit quaternion with w >= 0, versions 3
and 4 the three smallest components (sign + 9 bits, over sqrt(1/2)) and the index of the largest.

Axes: SPZ's README names right-up-back (RUB) as its frame, but Niantic's own ``ply_to_spz`` and
PlayCanvas's splat-transform (SuperSplat) store the PLY's coordinates unchanged, so that is what most SPZ
files hold and what this module writes and reads: no axis flip. (A file from an app that does convert to
RUB shows upside down: a half turn about x.) Written: version 3 (gzip) by default, which every SPZ reader
opens; version 4 with ``version=4``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from torch import Tensor

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.formats.common import (
    GaussianFileError,
    as_params,
    checked_for_writing,
    logit_of_unorm8,
    normalised_quats,
    pack_smallest_three,
    sh_degree_of_rest,
    sigmoid,
    unpack_smallest_three,
    warn_clamped,
)

MAGIC = 0x5053474E  # "NGSP"
LEGACY_HEADER = struct.Struct("<IIIBBBB")  # magic, version, points, sh degree, fractional bits, flags, reserved
V4_HEADER = struct.Struct("<IIIBBBBI12x")  # ... flags, stream count, table-of-contents offset, 12 reserved
FLAG_ANTIALIASED, FLAG_EXTENSIONS = 0x1, 0x2
COLOR_SCALE = 0.15
SH1_BUCKET, SH_REST_BUCKET = 8, 16  # 5 and 4 significant bits, Niantic's defaults
MAX_FRACTIONAL_BITS = 12
WRITABLE_VERSIONS = (2, 3, 4)


def _fractional_bits(means: np.ndarray, path: Path) -> int:
    """12 (Niantic's value, 1/4096 steps) unless the scene is too large for 24 bits at that precision."""
    extent = float(np.abs(means).max()) if means.size else 0.0
    for bits in range(MAX_FRACTIONAL_BITS, -1, -1):
        if extent * (1 << bits) < (1 << 23) - 1:
            return bits
    raise GaussianFileError(f"{path}: positions up to {extent:g} do not fit SPZ's 24-bit fixed point")


def _quantise_sh(values: np.ndarray, degree1: bool) -> np.ndarray:
    bucket = SH1_BUCKET if degree1 else SH_REST_BUCKET
    q = np.round(values.astype(np.float64) * 128.0) + 128.0
    q = np.floor((q + bucket // 2) / bucket) * bucket
    return np.clip(q, 0, 255).astype(np.uint8)


def encode_arrays(params: dict[str, np.ndarray], version: int, path: Path) -> tuple[int, list[bytes]]:
    """(fractional bits, [positions, alphas, colours, scales, rotations, sh]) of float32 parameters."""
    p = params
    n = len(p["means"])
    bits = _fractional_bits(p["means"], path)
    fixed = np.round(p["means"].astype(np.float64) * (1 << bits)).astype(np.int64)
    positions = np.stack([(fixed >> shift) & 0xFF for shift in (0, 8, 16)], axis=-1).astype(np.uint8)
    alphas = np.clip(np.round(sigmoid(p["opacities"]) * 255.0), 0, 255).astype(np.uint8)
    dc = p["sh0"].reshape(n, 3).astype(np.float64)
    warn_clamped("SPZ", "colour (SH DC)", dc, -127.5 / (COLOR_SCALE * 255), 127.5 / (COLOR_SCALE * 255))
    colors = np.clip(np.round(dc * (COLOR_SCALE * 255.0) + 127.5), 0, 255).astype(np.uint8)
    warn_clamped("SPZ", "log-scale", p["scales"], -10.0, 255 / 16 - 10.0)
    scales = np.clip(np.round((p["scales"].astype(np.float64) + 10.0) * 16.0), 0, 255).astype(np.uint8)
    xyzw = normalised_quats(p["quats"].astype(np.float64))[:, [1, 2, 3, 0]]
    if version >= 3:
        rotations = pack_smallest_three(xyzw, 9, signed=True).astype("<u4").view(np.uint8)
    else:
        xyz = xyzw[:, :3] * np.where(xyzw[:, 3:] < 0, -1.0, 1.0)
        rotations = np.clip(np.round(xyz * 127.5 + 127.5), 0, 255).astype(np.uint8)
    rest = p["shN"]
    warn_clamped("SPZ", "SH", rest, -1.0, 127 / 128)
    sh = np.concatenate([_quantise_sh(rest[:, :3], True), _quantise_sh(rest[:, 3:], False)], axis=1)
    arrays = [positions, alphas, colors, scales, rotations, sh.reshape(n, -1)]
    return bits, [np.ascontiguousarray(a).tobytes() for a in arrays]


def write_spz(path: str | os.PathLike, params: dict[str, Tensor], version: int = 3, antialiased: bool = False) -> None:
    """Write ``params`` as SPZ ``version`` (2, 3 or 4) atomically; ``antialiased`` sets the header flag."""
    path = Path(path)
    if version not in WRITABLE_VERSIONS:
        raise GaussianFileError(f"{path}: SPZ version {version} cannot be written; choose one of {WRITABLE_VERSIONS}")
    arrays = checked_for_writing(path, params, "write_spz")
    n, degree = len(arrays["means"]), sh_degree_of_rest(arrays["shN"].shape[1])
    bits, streams = encode_arrays(arrays, version, path)
    flags = FLAG_ANTIALIASED if antialiased else 0
    if version < 4:
        body = LEGACY_HEADER.pack(MAGIC, version, n, degree, bits, flags, 0) + b"".join(streams)
        data = gzip.compress(body, compresslevel=9, mtime=0)
    else:
        compressor = _zstd().ZstdCompressor(level=12)
        streams = [stream for stream in streams if stream]  # degree 0 has no SH stream
        chunks = [compressor.compress(stream) for stream in streams]
        table = b"".join(struct.pack("<QQ", len(c), len(s)) for c, s in zip(chunks, streams, strict=True))
        header = V4_HEADER.pack(MAGIC, 4, n, degree, bits, flags, len(chunks), V4_HEADER.size)
        data = header + table + b"".join(chunks)
    with atomic_write(path) as handle:
        handle.write(data)


def _zstd():
    try:
        import zstandard
    except ImportError as error:  # a dependency of the package; only a broken install lacks it
        raise GaussianFileError("SPZ version 4 uses zstd compression: install the `zstandard` package") from error
    return zstandard


def _sizes(n: int, degree: int, version: int) -> list[int]:
    position_bytes = 6 if version == 1 else 9
    rotation_bytes = 4 if version >= 3 else 3
    return [n * position_bytes, n, n * 3, n * 3, n * rotation_bytes, n * ((degree + 1) ** 2 - 1) * 3]


def _check_header(path: Path, version: int, n: int, degree: int, flags: int) -> None:
    if version not in (1, 2, 3, 4):
        raise GaussianFileError(f"{path}: SPZ version {version} is not supported (1 to 4 are)")
    if degree > 3:
        raise GaussianFileError(f"{path}: SH degree {degree}; only degrees 0 to 3 can be rendered here")
    if n == 0:
        raise GaussianFileError(f"{path}: the SPZ header announces no Gaussians")


def _legacy_streams(path: Path, raw: bytes) -> tuple[tuple[int, ...], list[bytes]]:
    try:
        body = gzip.decompress(raw)
    except EOFError as error:
        raise GaussianFileError(f"{path}: truncated SPZ file (the gzip stream ends early)") from error
    except (OSError, zlib.error) as error:
        raise GaussianFileError(f"{path}: corrupt SPZ file (gzip: {error})") from error
    if len(body) < LEGACY_HEADER.size:
        raise GaussianFileError(f"{path}: truncated SPZ file: {len(body)} bytes, no complete header")
    magic, version, n, degree, bits, flags, _ = LEGACY_HEADER.unpack_from(body)
    if magic != MAGIC:
        raise GaussianFileError(f"{path}: gzip data without the SPZ magic 'NGSP': not an SPZ file")
    _check_header(path, version, n, degree, flags)
    sizes = _sizes(n, degree, version)
    expected = LEGACY_HEADER.size + sum(sizes)
    if len(body) < expected or (len(body) > expected and not flags & FLAG_EXTENSIONS):
        what = "truncated" if len(body) < expected else "of another layout"
        raise GaussianFileError(f"{path}: {what}: an SPZ v{version} file of {n} Gaussians at SH degree {degree} "
                                f"holds {expected} bytes, this one {len(body)}")
    offsets = np.cumsum([LEGACY_HEADER.size, *sizes])
    return (version, n, degree, bits, flags), [body[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _v4_streams(path: Path, raw: bytes) -> tuple[tuple[int, ...], list[bytes]]:
    if len(raw) < V4_HEADER.size:
        raise GaussianFileError(f"{path}: truncated SPZ file: {len(raw)} bytes, no complete header")
    _, version, n, degree, bits, flags, count, toc = V4_HEADER.unpack_from(raw)
    _check_header(path, version, n, degree, flags)
    sizes = [size for size in _sizes(n, degree, version) if size]  # degree 0 has no SH stream
    if toc < V4_HEADER.size or toc + 16 * count > len(raw):
        raise GaussianFileError(f"{path}: truncated SPZ file: no complete table of contents ({count} streams at {toc})")
    entries = [struct.unpack_from("<QQ", raw, toc + 16 * i) for i in range(count)]
    if [unpacked for _, unpacked in entries] != sizes:
        raise GaussianFileError(f"{path}: of another layout: stream sizes {[u for _, u in entries]}, expected "
                                f"{sizes} for {n} Gaussians at SH degree {degree}")
    position, streams = toc + 16 * count, []
    decompressor = _zstd().ZstdDecompressor()
    for index, (packed, unpacked) in enumerate(entries):
        if position + packed > len(raw):
            raise GaussianFileError(f"{path}: truncated SPZ file: stream {index} ends past the end of the file")
        try:
            stream = decompressor.decompress(raw[position:position + packed], max_output_size=unpacked)
        except Exception as error:  # noqa: BLE001 - zstd raises its own ZstdError
            raise GaussianFileError(f"{path}: corrupt SPZ stream {index}: {error}") from error
        if len(stream) != unpacked:
            raise GaussianFileError(f"{path}: corrupt SPZ stream {index}: {len(stream)} bytes, not {unpacked}")
        streams.append(stream)
        position += packed
    if position != len(raw):
        raise GaussianFileError(f"{path}: of another layout: {len(raw) - position} bytes after the last stream")
    if degree == 0:
        streams.append(b"")
    return (version, n, degree, bits, flags), streams


def read_spz_header(path: str | os.PathLike) -> dict[str, int]:
    """``version``, ``points``, ``sh_degree``, ``fractional_bits``, ``flags`` of an SPZ file (no decoding)."""
    (version, n, degree, bits, flags), _ = _streams(Path(path))
    return {"version": version, "points": n, "sh_degree": degree, "fractional_bits": bits, "flags": flags}


def _streams(path: Path) -> tuple[tuple[int, ...], list[bytes]]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise GaussianFileError(f"{path}: cannot read: {error.strerror or error}") from error
    if raw[:2] == b"\x1f\x8b":
        return _legacy_streams(path, raw)
    if len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == MAGIC:
        return _v4_streams(path, raw)
    raise GaussianFileError(f"{path}: not an SPZ file (neither gzip data nor the 'NGSP' magic)")


def read_spz(path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw 3DGS parameters of an SPZ file of version 1 to 4."""
    path = Path(path)
    (version, n, degree, bits, _), (positions, alphas, colors, scales, rotations, sh) = _streams(path)
    if version == 1:
        means = np.frombuffer(positions, "<f2").reshape(n, 3).astype(np.float32)
    else:
        raw = np.frombuffer(positions, np.uint8).reshape(n, 3, 3).astype(np.int32)
        fixed = raw[..., 0] | raw[..., 1] << 8 | raw[..., 2] << 16
        fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
        means = fixed.astype(np.float64) / (1 << bits)
    rotation_bytes = np.frombuffer(rotations, np.uint8)
    if version >= 3:
        xyzw = unpack_smallest_three(rotation_bytes.view("<u4"), 9, signed=True)
    else:
        xyz = rotation_bytes.reshape(n, 3).astype(np.float64) / 127.5 - 1.0
        xyzw = np.concatenate([xyz, np.sqrt(np.maximum(0.0, 1.0 - (xyz**2).sum(1, keepdims=True)))], axis=1)
    rest = (np.frombuffer(sh, np.uint8).astype(np.float64) - 128.0) / 128.0
    arrays = {
        "means": means,
        "scales": np.frombuffer(scales, np.uint8).reshape(n, 3) / 16.0 - 10.0,
        "quats": xyzw[:, [3, 0, 1, 2]],
        "opacities": logit_of_unorm8(np.frombuffer(alphas, np.uint8)),
        "sh0": ((np.frombuffer(colors, np.uint8).reshape(n, 1, 3) / 255.0 - 0.5) / COLOR_SCALE),
        "shN": rest.reshape(n, (degree + 1) ** 2 - 1, 3),
    }
    arrays = {key: value.astype(np.float32) for key, value in arrays.items()}
    return as_params(arrays, path)
