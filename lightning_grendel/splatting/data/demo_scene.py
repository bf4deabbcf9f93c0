"""Procedural demo scene, ray cast analytically in torch: no files, no downloads, deterministic per seed.

Textured spheres and boxes stand on a checkered ground disk inside a sky dome whose colour is a
vertical gradient. The sky is real geometry (a sphere of radius ``DOME_RADIUS``), so every pixel is
a view-consistent surface that Gaussians can reconstruct, and initial points can be taken from it
like SfM points from a real capture. Lighting is a sun with hard shadows plus ambient light, and one
glossy sphere adds a view-dependent highlight for the spherical harmonics to fit. Images are small
(128 px by default) so that training on two CPU cores takes minutes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras, focal_from_fov, intrinsics_matrix, look_at_world_to_camera
from lightning_grendel.splatting.data.scene import ImageSplit, SceneData, resized_size

BASE_SIZE = 128
FIELD_OF_VIEW = math.radians(50.0)
DOME_RADIUS = 6.0
GROUND_RADIUS = 2.0
LOOK_AT = (0.0, 0.0, 0.35)
_EPS = 1e-6
_DTYPE = torch.float32  # float64 buys nothing visible at 8 bits and costs twice the time
_SUN = torch.tensor([0.45, -0.35, 0.82], dtype=_DTYPE)
_SUN = _SUN / _SUN.norm()
_AMBIENT, _DIFFUSE = 0.35, 0.75

# Spheres: centre, radius, colour a, colour b, pattern (0 latitude stripes, 1 lon/lat checker, 2 solid),
# specular strength (Blinn-Phong, exponent 40).
_SPHERES = [
    ((0.0, 0.0, 0.45), 0.45, (0.85, 0.15, 0.12), (0.95, 0.92, 0.85), 0, 0.35),
    ((0.9, 0.5, 0.25), 0.25, (0.15, 0.25, 0.75), (0.95, 0.8, 0.2), 1, 0.0),
    ((-0.7, 0.8, 0.3), 0.30, (0.2, 0.6, 0.25), (0.2, 0.6, 0.25), 2, 0.0),
]
# Boxes standing on the ground: centre, half size, yaw (degrees), colour a, colour b, checker cell size.
_BOXES = [
    ((-0.8, -0.5, 0.3), (0.3, 0.3, 0.3), 25.0, (0.95, 0.55, 0.1), (0.45, 0.2, 0.55), 0.15),
    ((0.7, -0.7, 0.2), (0.35, 0.2, 0.2), -40.0, (0.1, 0.55, 0.55), (0.9, 0.9, 0.9), 0.1),
    ((0.1, 1.0, 0.4), (0.1, 0.1, 0.4), 10.0, (0.8, 0.2, 0.6), (0.3, 0.1, 0.2), 0.2),
]
_CHECKER_LIGHT, _CHECKER_DARK = (0.9, 0.85, 0.7), (0.3, 0.35, 0.5)
_GRASS = (0.35, 0.5, 0.25)
_SKY_HORIZON, _SKY_ZENITH = (0.85, 0.88, 0.92), (0.3, 0.5, 0.85)


def _vec(values: tuple[float, ...]) -> Tensor:
    return torch.tensor(values, dtype=_DTYPE)


def _parity(*coordinates: Tensor) -> Tensor:
    """1 where the sum of the floors is odd: a checkerboard in any number of dimensions."""
    return (sum(torch.floor(c) for c in coordinates) % 2).unsqueeze(-1)


def _yaw(degrees: float) -> Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=_DTYPE)


def _hit_sphere(origins: Tensor, dirs: Tensor, center: Tensor, radius: float, far: bool = False) -> Tensor:
    """Ray distance to the sphere (near root, or far root from inside); inf on a miss."""
    oc = origins - center
    b = (oc * dirs).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - radius * radius)
    root = torch.sqrt(disc.clamp_min(0))
    t = -b + root if far else -b - root
    return torch.where((disc >= 0) & (t > _EPS), t, torch.inf)


def _hit_box(origins: Tensor, dirs: Tensor, center: Tensor, half: Tensor, rotation: Tensor) -> Tensor:
    """Slab test in the box frame; inf on a miss."""
    o = (origins - center) @ rotation
    d = dirs @ rotation
    d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (-half - o) / d, (half - o) / d
    t_near = torch.minimum(t1, t2).amax(-1)
    t_far = torch.maximum(t1, t2).amin(-1)
    return torch.where((t_far >= t_near) & (t_near > _EPS), t_near, torch.inf)


def _hit_ground(origins: Tensor, dirs: Tensor) -> Tensor:
    t = -origins[:, 2] / torch.where(dirs[:, 2].abs() < 1e-12, torch.full_like(dirs[:, 2], -1e-12), dirs[:, 2])
    return torch.where(t > _EPS, t, torch.inf)


def _all_hits(origins: Tensor, dirs: Tensor, objects_only: bool = False) -> Tensor:
    """[R, P] distances to every primitive: spheres, boxes, then ground and dome unless ``objects_only``."""
    hits = [_hit_sphere(origins, dirs, _vec(c), r) for c, r, *_ in _SPHERES]
    hits += [_hit_box(origins, dirs, _vec(c), _vec(h), _yaw(y)) for c, h, y, *_ in _BOXES]
    if objects_only:
        return torch.stack(hits, -1)
    hits.append(_hit_ground(origins, dirs))
    hits.append(_hit_sphere(origins, dirs, torch.zeros(3, dtype=_DTYPE), DOME_RADIUS, far=True))
    return torch.stack(hits, -1)


def _surface(points: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Normal, albedo and specular strength at ``points`` on primitive ``index``."""
    count = len(points)
    specular = torch.zeros(count, 1, dtype=_DTYPE)
    if index < len(_SPHERES):
        center, radius, color_a, color_b, pattern, shine = _SPHERES[index]
        normal = (points - _vec(center)) / radius
        if pattern == 0:
            mask = _parity(normal[:, 2] * 4 + 4)
        elif pattern == 1:
            lon = torch.atan2(normal[:, 1], normal[:, 0]) / (math.pi / 6)
            lat = torch.acos(normal[:, 2].clamp(-1, 1)) / (math.pi / 6)
            mask = _parity(lon, lat)
        else:
            mask = torch.zeros(count, 1, dtype=_DTYPE)
        albedo = _vec(color_a) * (1 - mask) + _vec(color_b) * mask
        return normal, albedo, specular + shine
    index -= len(_SPHERES)
    if index < len(_BOXES):
        center, half, yaw, color_a, color_b, cell = _BOXES[index]
        rotation = _yaw(yaw)
        local = (points - _vec(center)) @ rotation
        ratio = local / _vec(half)
        axis = ratio.abs().argmax(-1, keepdim=True)
        normal_local = torch.zeros_like(local).scatter(-1, axis, torch.sign(ratio.gather(-1, axis)))
        mask = _parity(*(local / cell + 1000).unbind(-1))
        albedo = _vec(color_a) * (1 - mask) + _vec(color_b) * mask
        return normal_local @ rotation.T, albedo, specular
    if index == len(_BOXES):
        normal = _vec((0.0, 0.0, 1.0)).expand(count, 3)
        x, y = points[:, 0], points[:, 1]
        mask = _parity(x / 0.25 + 1000, y / 0.25 + 1000)
        checker = _vec(_CHECKER_LIGHT) * (1 - mask) + _vec(_CHECKER_DARK) * mask
        grass = _vec(_GRASS) * (0.85 + 0.15 * torch.sin(1.7 * x) * torch.sin(1.3 * y)).unsqueeze(-1)
        inside = (x * x + y * y < GROUND_RADIUS**2).unsqueeze(-1)
        return normal, torch.where(inside, checker, grass), specular
    raise IndexError(index)


def _sky(points: Tensor) -> Tensor:
    elevation = (points[:, 2] / DOME_RADIUS).clamp(0, 1).unsqueeze(-1) ** 0.6
    return _vec(_SKY_HORIZON) * (1 - elevation) + _vec(_SKY_ZENITH) * elevation


def trace(origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
    """Shaded colour [R, 3] in [0, 1] and hit point [R, 3] of unit-direction rays."""
    hits = _all_hits(origins, dirs)
    t, primitive = hits.min(-1)
    points = origins + t.unsqueeze(-1) * dirs
    color = torch.empty_like(points)
    dome = primitive == hits.shape[-1] - 1
    color[dome] = _sky(points[dome])
    for index in range(hits.shape[-1] - 1):
        selected = primitive == index
        if not selected.any():
            continue
        p = points[selected]
        normal, albedo, specular = _surface(p, index)
        lit_origins = p + 1e-4 * normal
        shadow_hits = _all_hits(lit_origins, _SUN.expand_as(p), objects_only=True)
        lit = torch.isinf(shadow_hits).all(-1, keepdim=True).to(p.dtype)
        lambert = (normal @ _SUN).clamp_min(0).unsqueeze(-1) * lit
        half_vector = _SUN - dirs[selected]
        half_vector = half_vector / half_vector.norm(dim=-1, keepdim=True)
        highlight = ((normal * half_vector).sum(-1, keepdim=True).clamp_min(0) ** 40) * specular * lit
        color[selected] = albedo * (_AMBIENT + _DIFFUSE * lambert) + highlight
    return color.clamp(0, 1), points


def _pixel_rays(cameras: Cameras, index: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """World rays through pixel positions (x + offset, y + offset) of one camera; offsets in [0, 1)."""
    w2c = cameras.world_to_camera[index].to(_DTYPE)
    k = cameras.intrinsics[index].to(_DTYPE)
    ys, xs = torch.meshgrid(
        torch.arange(cameras.height, dtype=_DTYPE),
        torch.arange(cameras.width, dtype=_DTYPE),
        indexing="ij",
    )
    u = (xs[..., None] + offsets[:, 0]).reshape(-1)
    v = (ys[..., None] + offsets[:, 1]).reshape(-1)
    dirs_cam = torch.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], torch.ones_like(u)], -1)
    dirs = dirs_cam @ w2c[:3, :3]  # R^T d for each row
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origin = -w2c[:3, :3].T @ w2c[:3, 3]
    return origin.expand_as(dirs), dirs


def render_views(cameras: Cameras, supersample: int = 2, chunk: int = 1 << 18) -> Tensor:
    """uint8 [C, H, W, 3] renders, each pixel the mean of ``supersample``^2 stratified rays (anti-aliasing).

    Rays of all views are traced together in chunks, so small images do not pay per-view overhead.
    """
    grid = (torch.arange(supersample, dtype=_DTYPE) + 0.5) / supersample
    offsets = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    rays = [_pixel_rays(cameras, index, offsets) for index in range(len(cameras))]
    origins = torch.cat([origin for origin, _ in rays])
    dirs = torch.cat([direction for _, direction in rays])
    color = torch.cat([trace(o, d)[0] for o, d in zip(origins.split(chunk), dirs.split(chunk), strict=True)])
    color = color.reshape(len(cameras), cameras.height, cameras.width, len(offsets), 3).mean(3)
    return (color * 255).round().to(torch.uint8)


def orbit_cameras(count: int, width: int, height: int, generator: torch.Generator) -> Cameras:
    """Cameras around the scene, azimuths evenly spread (with jitter), random elevation and distance."""
    jitter = torch.rand(count, 3, generator=generator, dtype=torch.float64)
    azimuth = 2 * math.pi * (torch.arange(count, dtype=torch.float64) + 0.8 * jitter[:, 0]) / count
    return cameras_on_sphere(azimuth, 20 + 35 * jitter[:, 1], 3.6 + 0.8 * jitter[:, 2], width, height)


def cameras_on_sphere(azimuth: Tensor, elevation_deg: Tensor, distance: Tensor, width: int, height: int) -> Cameras:
    """Cameras at these spherical positions (float64 [C] each) looking at the scene's centre."""
    elevation = torch.deg2rad(elevation_deg)
    eyes = distance[:, None] * torch.stack(
        [torch.cos(elevation) * torch.cos(azimuth), torch.cos(elevation) * torch.sin(azimuth), torch.sin(elevation)],
        -1,
    )
    w2c = look_at_world_to_camera(eyes, torch.tensor(LOOK_AT, dtype=torch.float64))
    focal = focal_from_fov(FIELD_OF_VIEW, width)
    intrinsics = intrinsics_matrix(focal, focal, width / 2, height / 2).expand(len(azimuth), 3, 3).clone()
    return Cameras(w2c.to(torch.float32), intrinsics, width, height)


def surface_points(cameras: Cameras, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Points where random pixel rays of ``cameras`` hit the scene, with noisy positions and colours.

    Like an SfM point cloud: only seen surfaces, denser where the cameras look, a little off.
    """
    views = torch.randint(len(cameras), (count,), generator=generator)
    pixels = torch.rand(count, 2, generator=generator, dtype=_DTYPE)
    points, colors = [], []
    for index in views.unique().tolist():
        chosen = pixels[views == index] * torch.tensor([cameras.width, cameras.height], dtype=_DTYPE)
        origins, dirs = _pixel_rays(cameras, index, torch.zeros(1, 2, dtype=_DTYPE))
        flat = chosen[:, 1].long() * cameras.width + chosen[:, 0].long()
        color, hit = trace(origins[flat], dirs[flat])
        points.append(hit)
        colors.append(color)
    points, colors = torch.cat(points), torch.cat(colors)
    points = points + 0.01 * torch.randn(points.shape, generator=generator, dtype=_DTYPE)
    colors = colors + 0.05 * torch.randn(colors.shape, generator=generator, dtype=_DTYPE)
    return points.to(torch.float32), colors.clamp(0, 1).to(torch.float32)


def make_demo_scene(
    image_width: int | None = None,
    downscale: float = 1.0,
    seed: int = 0,
    num_train: int = 48,
    num_val: int = 4,
    num_test: int = 8,
    num_points: int = 5_000,
    supersample: int = 2,
) -> SceneData:
    """The demo scene at ``BASE_SIZE`` px (or ``image_width`` / ``BASE_SIZE / downscale``), disjoint splits.

    All views share one orbit distribution and a seeded permutation assigns them to splits, so val and
    test views lie between training views.
    """
    width, height = resized_size(BASE_SIZE, BASE_SIZE, image_width, downscale)
    generator = torch.Generator().manual_seed(seed)
    total = num_train + num_val + num_test
    cameras = orbit_cameras(total, width, height, generator)
    order = torch.randperm(total, generator=generator)
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val), "test": (num_train + num_val, total)}
    splits = {}
    for name, (start, stop) in bounds.items():
        chosen = order[start:stop].sort().values
        split_cameras = cameras[chosen]
        names = [f"demo_{i:03d}" for i in chosen.tolist()]
        splits[name] = ImageSplit(render_views(split_cameras, supersample), split_cameras, names)
    points, colors = surface_points(splits["train"].cameras, num_points, generator)
    return SceneData(splits["train"], splits["val"], splits["test"], points, colors)
