"""A small CLEVR-like ray caster: cubes, spheres and cylinders on a gray floor, in torch on the CPU.

The scene follows CLEVR: a fixed perspective camera with CLEVR's lens and 4:3 frame looking down
at the floor, a key light with soft floor shadows plus sky light, matte (rubber) and shiny (metal)
materials, CLEVR's eight colours. World units: the floor is z = 0, x runs left to right and y away
from the camera, objects sit in about [-3, 3] x [-3, 3].

Speed: each object is ray-traced only inside a screen rectangle that bounds it (and one that
bounds its shadow); object pixels are shaded in a compacted list, the floor at output resolution.

Byte-exact determinism. A scene's pixels must not depend on what else is in its batch, on the
thread count or on the machine's SIMD tail handling. So every per-pixel computation uses only
correctly rounded operations (+ - * /, sqrt, min/max, comparisons, gathers, fixed-order sums);
no exp/pow/sin per pixel (the trigonometry is done per object with Python's math module).
Vectors are kept as separate x/y/z tensors for the same reason (no reductions over a dim).

The scenes themselves (objects, colours, camera, ray intersections) are in scene.py.

Output frames always show CLEVR's 4:3 field of view; a square size such as 64x64 is that frame
squashed, which is exactly what the course's loaders make of the real 320x240 images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from iclevr_diffusion.data.scene import (
    _SHAPE_CODE,
    CAMERA,
    EPS,
    FLOOR_ALBEDO,
    FRAME_ASPECT,
    INF,
    LIGHT,
    _basis,
    _box_corners,
    _intersect,
    _normalize3,
    as_object,
    project,
)

# The scene, camera and ray-object intersections live in scene.py; these names are re-exported here,
# where callers import them from.
from iclevr_diffusion.data.scene import COLOR_RGB as COLOR_RGB
from iclevr_diffusion.data.scene import MATERIALS as MATERIALS
from iclevr_diffusion.data.scene import SIZES as SIZES
from iclevr_diffusion.data.scene import SceneObject as SceneObject
from iclevr_diffusion.data.scene import in_frame as in_frame
from iclevr_diffusion.data.scene import parse_size as parse_size
from iclevr_diffusion.errors import IclevrError

# ----------------------------------------------------------------------------------- rendering


@dataclass
class RenderResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    visible: np.ndarray  # (B, N) samples where the object is the nearest surface
    footprint: np.ndarray  # (B, N) samples its rays hit, ignoring the other objects
    masks: np.ndarray | None = None  # (B, N, H, W) float32 coverage of each object's visible part

    @property
    def visible_fraction(self) -> np.ndarray:
        """(B, N) share of each object not hidden by the others (1 for padding slots)."""
        return np.where(self.footprint > 0, self.visible / np.maximum(self.footprint, 1), 1.0)


def render_scenes(
    scenes: Sequence[Sequence[SceneObject | Mapping]],
    size: str | int | Sequence[int] = 64,
    *,
    supersample: int = 2,
    masks: bool = False,
    max_samples: int = 1 << 20,
) -> RenderResult:
    """Render a batch of scenes (each a list of objects; the counts may differ; N is the largest).

    Every image is the same bytes whether rendered alone or in any batch (see the module notes);
    `max_samples` bounds the rays traced at once (memory), not the result.
    """
    w, h = parse_size(size)
    if isinstance(supersample, bool) or not isinstance(supersample, int) or not 1 <= supersample <= 8:
        raise IclevrError(f"supersample must be an integer from 1 to 8, got {supersample!r}.")
    scenes = [[as_object(o) for o in s] for s in scenes]
    if not scenes:
        raise IclevrError("Nothing to render: no scenes given.")
    n = max(1, max(len(s) for s in scenes))
    per_chunk = max(1, max_samples // (w * h * supersample * supersample))
    parts = [
        _render_chunk(scenes[i : i + per_chunk], n, w, h, supersample, masks)
        for i in range(0, len(scenes), per_chunk)
    ]
    return RenderResult(
        images=np.concatenate([p.images for p in parts]),
        visible=np.concatenate([p.visible for p in parts]),
        footprint=np.concatenate([p.footprint for p in parts]),
        masks=np.concatenate([p.masks for p in parts]) if masks else None,
    )


def render_scene(
    objects: Sequence[SceneObject | Mapping],
    size: str | int | Sequence[int] = 64,
    *,
    supersample: int = 2,
    masks: bool = False,
):
    """Render one scene: an (H, W, 3) uint8 array; with `masks=True` also an (N, H, W) float32
    array, each object's visible coverage per pixel (1 where it is the nearest surface throughout)."""
    result = render_scenes([objects], size, supersample=supersample, masks=masks)
    if masks:
        return result.images[0], result.masks[0][: len(objects)]
    return result.images[0]


@lru_cache(maxsize=8)
def _frame(ws: int, hs: int):
    """Per-pixel camera ray directions, floor points and light fall-off, float32 (P,), per size."""
    import torch

    f, right, up, tan_h = _basis()
    u = ((np.arange(ws) + 0.5) / ws * 2 - 1) * tan_h
    v = (1 - (np.arange(hs) + 0.5) / hs * 2) * tan_h / FRAME_ASPECT
    u, v = np.meshgrid(u, v)  # (hs, ws)
    d = [f[i] + u * right[i] + v * up[i] for i in range(3)]
    norm = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    dx, dy, dz = (torch.from_numpy((c / norm).astype(np.float32).reshape(-1)) for c in d)
    t = torch.where(dz < 0, -CAMERA[2] / torch.clamp(dz, max=-1e-6), 1e4)  # the frame shows no sky
    fx, fy = CAMERA[0] + t * dx, CAMERA[1] + t * dy
    fall = 1.0 / (1.0 + 0.006 * (fx * fx + (fy - 0.5) * (fy - 0.5)))  # soft fall-off of the light
    return dx, dy, dz, fx, fy, fall


def _object_table(scenes, n: int) -> dict[str, np.ndarray]:
    """Per-object parameters as flat (B*N,) arrays; empty slots have shape -1."""
    keys = ("shape", "x", "y", "r", "h", "cos", "sin", "metal", "cr", "cg", "cb")
    empty = (-1, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    rows = []
    for scene in scenes:
        for j in range(n):
            if j >= len(scene):
                rows.append(empty)
                continue
            o = scene[j]
            a = math.radians(o.rotation)
            rgb = [(c / 255.0) ** 2 for c in COLOR_RGB[o.color]]  # linear, for gamma 2
            rows.append((_SHAPE_CODE[o.shape], o.x, o.y, o.radius, o.radius / math.sqrt(2),
                         math.cos(a), math.sin(a), float(o.material == "metal"), *rgb))
    cols = list(zip(*rows, strict=True))
    return {k: np.array(c, dtype=np.int64 if k == "shape" else np.float64) for k, c in zip(keys, cols, strict=True)}


def _windows(torch, table, rows, ws, hs, shadow: bool):
    """Pixel indices (M, K) of a rectangle per object that holds all its pixels (or all its
    shadow and contact darkening). The rectangles share one size; each is conservative, so the
    result never depends on that size."""
    x, y, r = table["x"][rows], table["y"][rows], table["r"][rows]
    xs, ys, zs = _box_corners(x, y, r)
    if shadow:  # the box's shadow on the floor, and the contact-darkening disc
        lgt = _normalize3(*LIGHT)
        s = zs[:, 4:] / lgt[2]
        disc = np.array([-1.9, 1.9])
        dxs, dys = np.meshgrid(disc, disc)
        xs = np.concatenate([xs, xs[:, 4:] - s * lgt[0], x[:, None] + dxs.ravel() * r[:, None]], 1)
        ys = np.concatenate([ys, ys[:, 4:] - s * lgt[1], y[:, None] + dys.ravel() * r[:, None]], 1)
        zs = np.concatenate([zs, np.zeros_like(zs[:, 4:]), np.zeros((len(x), 4))], 1)
    u, v, depth = project(xs, ys, zs)
    px, py = (u + 1) / 2 * ws - 0.5, (1 - v) / 2 * hs - 0.5
    behind = (depth <= 0.1).any(1)
    x0 = np.where(behind, 0, np.clip(np.floor(px.min(1)) - 2, 0, ws - 1)).astype(np.int64)
    x1 = np.where(behind, ws - 1, np.clip(np.ceil(px.max(1)) + 2, 0, ws - 1)).astype(np.int64)
    y0 = np.where(behind, 0, np.clip(np.floor(py.min(1)) - 2, 0, hs - 1)).astype(np.int64)
    y1 = np.where(behind, hs - 1, np.clip(np.ceil(py.max(1)) + 2, 0, hs - 1)).astype(np.int64)
    kw, kh = int((x1 - x0).max()) + 1, int((y1 - y0).max()) + 1
    x0, y0 = np.minimum(x0, ws - kw), np.minimum(y0, hs - kh)
    idx = (y0[:, None, None] + np.arange(kh)[None, :, None]) * ws + x0[:, None, None] + np.arange(kw)
    return torch.from_numpy(idx.reshape(len(rows), -1))


def _render_chunk(scenes, n: int, w: int, h: int, ss: int, want_masks: bool) -> RenderResult:
    import torch

    # One thread: these ops are too small to gain from more, and on a busy machine OpenMP threads
    # waiting for each other cost several times the work. Parallelism comes from processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _render_chunk_torch(torch, scenes, n, w, h, ss, want_masks)
    finally:
        torch.set_num_threads(threads)


def _render_chunk_torch(torch, scenes, n, w, h, ss, want_masks):
    ws, hs = w * ss, h * ss
    p, b = ws * hs, len(scenes)
    dx, dy, dz, fx, fy, _ = _frame(ws, hs)
    table = _object_table(scenes, n)
    obj = {k: torch.from_numpy(v if k == "shape" else v.astype(np.float32)) for k, v in table.items()}
    rows_np = np.nonzero(table["shape"] >= 0)[0]
    rows = torch.from_numpy(rows_np)
    slot, img_base = (rows % n).unsqueeze(1), (rows // n).unsqueeze(1) * p
    cam = tuple(torch.tensor(c, dtype=torch.float32) for c in CAMERA)
    lgt = _normalize3(*LIGHT)
    visible, footprint = np.zeros((b, n), np.int64), np.zeros((b, n), np.int64)

    # Primary rays inside each object's window (outside it, the object is missed). Nearest hit per
    # pixel by scatter-min, then the earliest slot among the objects at that distance.
    t_best = torch.full((b * p,), INF)
    winner = torch.full((b * p,), n, dtype=torch.int64)
    if len(rows_np):
        win = _windows(torch, table, rows_np, ws, hs, shadow=False)
        t_win = _intersect(torch, obj, rows, cam, (dx[win], dy[win], dz[win]))
        at = img_base + win
        t_best.scatter_reduce_(0, at.view(-1), t_win.view(-1), "amin")
        hits = t_win < INF
        first = torch.where(hits & (t_win == t_best[at]), slot, n)
        winner.scatter_reduce_(0, at.view(-1), first.view(-1), "amin")
        footprint.reshape(-1)[rows_np] = hits.sum(1).numpy()
        visible.reshape(-1)[rows_np] = (hits & (winner[at] == slot)).sum(1).numpy()
    winner = torch.where(winner == n, -1, winner)

    # Object samples, compacted: hit points and normals.
    flat = torch.nonzero(winner >= 0).flatten()
    pix = flat % p
    g = {k: v[(flat // p) * n + winner[flat]] for k, v in obj.items()}
    t = t_best[flat]
    ddx, ddy, ddz = dx[pix], dy[pix], dz[pix]
    hx, hy, hz = cam[0] + t * ddx, cam[1] + t * ddy, cam[2] + t * ddz
    nx, ny, nz = _normals(torch, g, hx, hy, hz)

    # Shadow rays toward the key light from just above each surface, inside each object's shadow
    # window; a sample is in shadow if any object blocks it (scatter-max: order-free).
    shadow = torch.zeros(b * p)
    if len(rows_np):
        win = _windows(torch, table, rows_np, ws, hs, shadow=True)
        at = img_base + win
        where = torch.full((b * p,), -1, dtype=torch.int64)
        where[flat] = torch.arange(len(flat))
        k = where[at]
        on_obj, k = k >= 0, k.clamp(min=0)
        pad = lambda a: torch.cat([a, a.new_zeros(1)])  # noqa: E731  (k = 0 must exist)
        sx, sy, sz = pad(hx + 4 * EPS * nx), pad(hy + 4 * EPS * ny), pad(hz + 4 * EPS * nz)
        origin = (torch.where(on_obj, sx[k], fx[win]), torch.where(on_obj, sy[k], fy[win]),
                  torch.where(on_obj, sz[k], 4 * EPS))
        light = tuple(torch.full((1, 1), c) for c in lgt)
        blocked = (_intersect(torch, obj, rows, origin, light) < INF).float()
        shadow.scatter_reduce_(0, at.view(-1), blocked.view(-1), "amax")

    floor, floor_share = _floor(torch, table, rows_np, b, w, h, ss, winner, shadow, lgt)  # (b, h, w)
    cols = torch.stack(_shade(torch, g, nx, ny, nz, ddx, ddy, ddz, 1 - shadow[flat], lgt), 1)
    samples = torch.zeros(b * p, 3)
    samples[flat] = cols
    image = _downsample(samples.view(b, hs, ws, 3), ss, dims=(1, 2))
    image = image + (floor * floor_share).unsqueeze(3)  # floor samples all share their pixel's colour
    image = torch.floor(image * 255 + 0.5).clamp(0, 255).to(torch.uint8)

    masks = None
    if want_masks:
        m = torch.stack([(winner.view(b, p) == j).float() for j in range(n)], 1).view(b, n, hs, ws)
        masks = _downsample(m, ss).numpy()
    return RenderResult(image.numpy(), visible, footprint, masks)


def _floor(torch, table, rows_np, b, w, h, ss, winner, shadow, lgt):
    """Gamma-2 floor colour per output pixel: soft shadows (the floor's light mask, blurred and
    normalised by the floor mask), contact darkening near each object, gentle fall-off."""
    fx, fy, fall = _frame(w, h)[3:]
    ws, hs = w * ss, h * ss
    is_floor = (winner < 0).float().view(b, 1, hs, ws)
    floor = _downsample(is_floor, ss)
    lit = _downsample(is_floor * (1 - shadow.view(b, 1, hs, ws)), ss)
    radius = max(1, round(w / 40))
    soft = (_blur(torch, lit, radius) / torch.clamp(_blur(torch, floor, radius), min=1e-6)).view(b, h * w)
    dark = torch.zeros(b * h * w)
    if len(rows_np):
        win = _windows(torch, table, rows_np, w, h, shadow=True)
        c = {k: torch.from_numpy(table[k][rows_np].astype(np.float32)).unsqueeze(1) for k in ("x", "y", "r")}
        qx, qy = fx[win] - c["x"], fy[win] - c["y"]
        k = torch.clamp(1 - (torch.sqrt(qx * qx + qy * qy) - c["r"]) / (0.9 * c["r"]), min=0, max=1)
        at = torch.from_numpy(rows_np // (len(table["shape"]) // b)).unsqueeze(1) * (h * w) + win
        dark.scatter_reduce_(0, at.view(-1), (0.45 * k * k).view(-1), "amax")
    col = FLOOR_ALBEDO * (0.5 + 0.62 * lgt[2] * soft) * fall * (1 - dark.view(b, h * w))
    return torch.sqrt(torch.clamp(col, 0, 1)).view(b, h, w), floor.view(b, h, w)


def _normals(torch, g, hx, hy, hz):
    """Surface normals at hit points, from each pixel's object parameters."""
    qx, qy = hx - g["x"], hy - g["y"]
    r = g["r"]
    # sphere
    sx, sy, sz = qx / r, qy / r, (hz - r) / r
    # cylinder: cap or side, whichever surface the point is nearer to
    rho = torch.sqrt(qx * qx + qy * qy)
    on_cap = (hz - 2 * r).abs() < (rho - r).abs()
    inv_rho = 1.0 / torch.clamp(rho, min=1e-6)
    yx, yy = torch.where(on_cap, 0.0, qx * inv_rho), torch.where(on_cap, 0.0, qy * inv_rho)
    yz = on_cap.float()
    # cube: the local axis with the largest coordinate
    cos, sin = g["cos"], g["sin"]
    lx, ly, lz = cos * qx + sin * qy, cos * qy - sin * qx, hz - g["h"]
    ax, ay, az = lx.abs(), ly.abs(), lz.abs()
    mx = (ax >= ay) & (ax >= az)
    my = ~mx & (ay >= az)
    mz = ~mx & ~my
    nlx, nly = torch.where(mx, torch.sign(lx), 0.0), torch.where(my, torch.sign(ly), 0.0)
    cx, cy, cz = cos * nlx - sin * nly, sin * nlx + cos * nly, torch.where(mz, torch.sign(lz), 0.0)
    shape = g["shape"]
    pick = lambda s, y, c: torch.where(shape == 1, s, torch.where(shape == 2, y, c))  # noqa: E731
    return pick(sx, yx, cx), pick(sy, yy, cy), pick(sz, yz, cz)


def _shade(torch, g, nx, ny, nz, dx, dy, dz, lit, lgt):
    """Linear -> gamma-2 colour of object pixels: sky + Lambert key light, Blinn-Phong highlight;
    metal reflects a sky/floor environment and has a sharper, stronger highlight."""
    ndl = torch.clamp(nx * lgt[0] + ny * lgt[1] + nz * lgt[2], min=0)
    sky = 0.55 + 0.45 * nz  # hemisphere light: full from above, half from the side
    vx, vy, vz = lgt[0] - dx, lgt[1] - dy, lgt[2] - dz  # half vector direction L + V, V = -d
    ndh = torch.clamp((nx * vx + ny * vy + nz * vz) / torch.sqrt(vx * vx + vy * vy + vz * vz), min=0)
    s2 = ndh * ndh
    s8 = (s2 * s2) * (s2 * s2)
    s16 = s8 * s8
    s64 = (s16 * s16) * (s16 * s16)  # powers by squaring: exact and batch independent
    rz = dz - 2 * (dx * nx + dy * ny + dz * nz) * nz  # reflected ray's z: sky above, floor below
    env = torch.where(rz > 0, 0.35 + 0.5 * torch.clamp(rz, max=1), FLOOR_ALBEDO * 0.6)
    metal = g["metal"] > 0
    light = 0.42 * sky + 0.75 * ndl * lit
    out = []
    for base in (g["cr"], g["cg"], g["cb"]):
        rubber = base * light + 0.06 * s16 * lit
        shiny = base * (0.25 * light + 0.9 * env) + 0.9 * s64 * lit + 0.08 * s8 * lit
        out.append(torch.sqrt(torch.clamp(torch.where(metal, shiny, rubber), 0, 1)))
    return out


def _blur(torch, x, radius: int):
    """Two separable passes of a (2r+1) box filter with zero padding (a soft tent), per image."""
    import torch.nn.functional as F

    k = 2 * radius + 1
    for _ in range(2):
        for dim in (-1, -2):
            pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
            xp, size = F.pad(x, pad), x.shape[dim]
            acc = xp.narrow(dim, 0, size)
            for i in range(1, k):
                acc = acc + xp.narrow(dim, i, size)
            x = acc * (1.0 / k)
    return x


def _downsample(x, ss: int, dims: tuple[int, int] = (-2, -1)):
    """Mean of each ss x ss block over `dims`, summed in a fixed order."""
    if ss == 1:
        return x
    acc = None
    for i in range(ss):
        for j in range(ss):
            index = [slice(None)] * x.dim()
            index[dims[0]], index[dims[1]] = slice(i, None, ss), slice(j, None, ss)
            part = x[tuple(index)]
            acc = part if acc is None else acc + part
    return acc * (1.0 / (ss * ss))
