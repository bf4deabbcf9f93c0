"""Camera paths for novel-view videos: an orbit around the scene centre the training cameras look at, or a
smooth interpolation through the training cameras themselves (the views the capture is known to cover)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras, look_at_world_to_camera
from lightning_grendel.splatting.projection import quaternion_to_rotation

PATH_KINDS = ("orbit", "interpolate")
ORDERS = ("training", "nearest")


def look_at_centre(cameras: Cameras) -> torch.Tensor:
    """The point closest (least squares) to every camera's optical axis: what the capture looks at."""
    rotation = cameras.world_to_camera[:, :3, :3].to(torch.float64)
    axes = rotation[:, 2]  # camera z (forward) in world coordinates
    centres = cameras.centers.to(torch.float64)
    projector = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]
    system, rhs = projector.sum(0), (projector @ centres[..., None]).sum(0)[:, 0]
    if len(cameras) < 2 or torch.linalg.matrix_rank(system) < 3:
        return centres.mean(0) + axes.mean(0)
    return torch.linalg.solve(system, rhs)


def orbit_path(cameras: Cameras, frames: int, width: int | None = None) -> Cameras:
    """``frames`` cameras circling the look-at centre at the training cameras' mean radius and height.

    Up is the training cameras' mean up vector (COLMAP scenes are not z-up); intrinsics are the first
    camera's, scaled to ``width`` pixels when given.
    """
    if frames < 1:
        raise ValueError(f"orbit_path: frames must be >= 1, got {frames}")
    centre = look_at_centre(cameras)
    up = -cameras.world_to_camera[:, 1, :3].to(torch.float64).mean(0)  # image y points down
    up = up / up.norm().clamp_min(1e-12)
    offsets = cameras.centers.to(torch.float64) - centre
    height = (offsets @ up).mean()
    radial = offsets - (offsets @ up)[:, None] * up
    radius = radial.norm(dim=1).mean().clamp_min(1e-6)
    first = radial[0] / radial[0].norm().clamp_min(1e-12) if radial[0].norm() > 1e-9 else _any_perpendicular(up)
    second = torch.linalg.cross(up, first)
    eyes = torch.stack([
        centre + height * up + radius * (math.cos(a) * first + math.sin(a) * second)
        for a in (2 * math.pi * i / frames for i in range(frames))
    ])
    return _path_cameras(look_at_world_to_camera(eyes, centre, up), cameras, width)


def interpolation_path(cameras: Cameras, frames: int, width: int | None = None, order: str = "training") -> Cameras:
    """``frames`` cameras gliding through the training poses, first to last, evenly in knot index.

    Positions follow a Catmull-Rom spline through the camera centres (ends extended linearly), rotations
    are slerped between neighbouring cameras (shortest arc), so the path passes through every training
    pose where its parameter is a whole number: with ``frames - 1`` a multiple of ``cameras - 1``, frame
    ``i * (frames - 1) / (cameras - 1)`` is training pose ``i``. ``order`` is ``training`` (the dataset's
    order, sorted by image name: capture order for most COLMAP scenes) or ``nearest`` (a greedy
    nearest-neighbour tour of the centres from the first camera, for unordered captures). Intrinsics as
    in :func:`orbit_path`.
    """
    if frames < 1:
        raise ValueError(f"interpolation_path: frames must be >= 1, got {frames}")
    if order not in ORDERS:
        raise ValueError(f"interpolation_path: order must be one of {', '.join(ORDERS)}; got {order!r}")
    centres = cameras.centers.to(torch.float64)
    knots = torch.arange(len(cameras)) if order == "training" else _nearest_neighbour_tour(centres)
    centres = centres[knots]
    quats = rotation_to_quaternion(cameras.world_to_camera[knots, :3, :3].to(torch.float64))
    if len(knots) == 1:
        segment, fraction = torch.zeros(frames, dtype=torch.long), torch.zeros(frames, dtype=torch.float64)
        centres, quats = torch.cat([centres, centres]), torch.cat([quats, quats])
    else:
        t = torch.linspace(0, len(knots) - 1, frames, dtype=torch.float64) if frames > 1 else torch.zeros(1)
        segment = t.floor().long().clamp_max(len(knots) - 2)
        fraction = (t - segment).to(torch.float64)
    eyes = _catmull_rom(centres, segment, fraction)
    rotation = quaternion_to_rotation(slerp(quats[segment], quats[segment + 1], fraction))
    world_to_camera = torch.eye(4, dtype=torch.float64).expand(frames, 4, 4).clone()
    world_to_camera[:, :3, :3] = rotation
    world_to_camera[:, :3, 3] = -(rotation @ eyes[..., None])[..., 0]
    return _path_cameras(world_to_camera, cameras, width)


def camera_path(kind: str, cameras: Cameras, frames: int, width: int | None = None, order: str = "training") -> Cameras:
    """The ``kind`` path (``orbit`` or ``interpolate``) of ``frames`` cameras; ``order`` is interpolation's."""
    if kind == "orbit":
        return orbit_path(cameras, frames, width)
    if kind == "interpolate":
        return interpolation_path(cameras, frames, width, order)
    raise ValueError(f"camera path must be one of {', '.join(PATH_KINDS)}; got {kind!r}")


def rotation_to_quaternion(rotation: Tensor) -> Tensor:
    """Unit (w, x, y, z) quaternions of rotation matrices [..., 3, 3] (Shepperd: divide by the largest
    component, so no branch loses precision near 180 degrees)."""
    (r00, r01, r02), (r10, r11, r12), (r20, r21, r22) = (row.unbind(-1) for row in rotation.unbind(-2))
    trace = r00 + r11 + r22
    candidates = torch.stack([  # row k is 4 q_k (w, x, y, z): exact whichever q_k is largest
        torch.stack([1 + trace, r21 - r12, r02 - r20, r10 - r01], -1),
        torch.stack([r21 - r12, 1 + r00 - r11 - r22, r01 + r10, r02 + r20], -1),
        torch.stack([r02 - r20, r01 + r10, 1 - r00 + r11 - r22, r12 + r21], -1),
        torch.stack([r10 - r01, r02 + r20, r12 + r21, 1 - r00 - r11 + r22], -1),
    ], -2)
    best = torch.stack([trace, r00, r11, r22], -1).argmax(-1)
    quats = torch.take_along_dim(candidates, best[..., None, None], dim=-2)[..., 0, :]
    return quats / quats.norm(dim=-1, keepdim=True)


def slerp(start: Tensor, end: Tensor, fraction: Tensor) -> Tensor:
    """Spherical interpolation of unit quaternions [..., 4] along the shorter arc (``fraction`` [...])."""
    dot = (start * end).sum(-1)
    end = torch.where(dot[..., None] < 0, -end, end)
    dot = dot.abs().clamp_max(1.0)
    angle = torch.acos(dot)
    sine = torch.sin(angle)
    close = sine < 1e-6  # (nearly) the same rotation: linear is exact enough and avoids 0/0
    safe = torch.where(close, torch.ones_like(sine), sine)
    a = torch.where(close, 1 - fraction, torch.sin((1 - fraction) * angle) / safe)
    b = torch.where(close, fraction, torch.sin(fraction * angle) / safe)
    quats = a[..., None] * start + b[..., None] * end
    return quats / quats.norm(dim=-1, keepdim=True)


def _catmull_rom(points: Tensor, segment: Tensor, fraction: Tensor) -> Tensor:
    """Uniform Catmull-Rom through ``points`` [K, 3]: position ``fraction`` of the way along ``segment``."""
    padded = torch.cat([2 * points[:1] - points[1:2], points, 2 * points[-1:] - points[-2:-1]])
    p0, p1, p2, p3 = (padded[segment + i] for i in range(4))
    s = fraction[:, None]
    return 0.5 * (2 * p1 + (p2 - p0) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2 + (3 * p1 - p0 - 3 * p2 + p3) * s**3)


def _nearest_neighbour_tour(centres: Tensor) -> Tensor:
    """Camera indices from camera 0, each step to the closest camera not yet visited."""
    distances = torch.cdist(centres, centres)
    visited = torch.zeros(len(centres), dtype=torch.bool)
    tour = [0]
    visited[0] = True
    for _ in range(len(centres) - 1):
        candidates = distances[tour[-1]].masked_fill(visited, math.inf)
        tour.append(int(candidates.argmin()))
        visited[tour[-1]] = True
    return torch.tensor(tour)


def _path_cameras(world_to_camera: Tensor, cameras: Cameras, width: int | None) -> Cameras:
    """Path poses with the first training camera's intrinsics, scaled to ``width`` pixels when given."""
    intrinsics = cameras.intrinsics[:1].clone()
    size = (cameras.width, cameras.height)
    if width is not None and width != cameras.width:
        size = (width, max(1, round(cameras.height * width / cameras.width)))
        intrinsics[:, 0] *= size[0] / cameras.width
        intrinsics[:, 1] *= size[1] / cameras.height
    frames = len(world_to_camera)
    return Cameras(world_to_camera.to(torch.float32), intrinsics.expand(frames, 3, 3).clone(), size[0], size[1])


def _any_perpendicular(vector: torch.Tensor) -> torch.Tensor:
    other = torch.tensor([1.0, 0.0, 0.0], dtype=vector.dtype)
    if abs(float(vector @ other)) > 0.9:
        other = torch.tensor([0.0, 1.0, 0.0], dtype=vector.dtype)
    result = torch.linalg.cross(vector, other)
    return result / result.norm()
