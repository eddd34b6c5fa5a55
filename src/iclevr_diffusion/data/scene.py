"""The scenes the ray caster draws (render.py): objects, CLEVR's colours and sizes, the camera, and
where a ray first hits a cube, sphere or cylinder.

World units: the floor is z = 0, x runs left to right and y away from the camera, objects sit in
about [-3, 3] x [-3, 3]. Every per-pixel function uses only correctly rounded operations (see
render.py: byte-exact determinism).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import COLORS, SHAPES

# CLEVR's RGB values (its properties.json), gamma-encoded.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
MATERIALS = ("rubber", "metal")
# Radius of the object's footprint; CLEVR uses 0.7 and 0.35, our small is larger so that a small
# object still covers enough pixels at 64x64 to show its shape.
SIZES: dict[str, float] = {"large": 0.7, "small": 0.55}
MAX_SIZE = 4096  # longest side accepted for --size

# Camera: CLEVR's 35 mm lens on a 32 mm sensor, but closer than CLEVR's (10.1 units away, 5 up) so
# that objects fill 10-20% of a 64x64 frame, and a little higher (33 degrees down) so that cylinder
# tops show and tell them from cubes.
CAMERA = (0.0, -6.3, 4.5)
LOOK_AT = (0.0, 0.6, 0.0)
HFOV_DEG = 49.13
FRAME_ASPECT = 4 / 3
# Direction toward the key light (upper left, in front): shadows fall to the back right.
LIGHT = (-0.5, -0.3, 0.62)
FLOOR_ALBEDO = 0.36  # linear; lit floor comes out around 150/255
EPS = 1e-3
INF = float("inf")
_SHAPE_CODE = {name: i for i, name in enumerate(SHAPES)}  # cube 0, sphere 1, cylinder 2


@dataclass(frozen=True)
class SceneObject:
    """One object: its class (colour + shape), look, and place on the floor."""

    shape: str  # cube | sphere | cylinder
    color: str  # one of the 8 CLEVR colours
    material: str = "rubber"  # rubber (matte) | metal (shiny)
    size: str = "large"  # large | small
    x: float = 0.0  # left (-) to right (+), about -3..3
    y: float = 0.0  # near (-) to far (+), about -3..3
    rotation: float = 0.0  # degrees about the vertical axis (cubes only show it)

    def __post_init__(self):
        for field, value, choices in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLORS),
            ("material", self.material, MATERIALS),
            ("size", self.size, tuple(SIZES)),
        ):
            if value not in choices:
                raise IclevrError(f"Object {field} '{value}' is not one of: {', '.join(choices)}.")

    @property
    def label(self) -> str:
        """The class name, e.g. 'red cube'."""
        return f"{self.color} {self.shape}"

    @property
    def radius(self) -> float:
        return SIZES[self.size]


def as_object(obj: SceneObject | Mapping) -> SceneObject:
    """Accept a SceneObject or a dict with the same keys."""
    if isinstance(obj, SceneObject):
        return obj
    if isinstance(obj, Mapping):
        try:
            return SceneObject(**obj)
        except TypeError as e:
            raise IclevrError(f"Bad object description {dict(obj)!r}: {e}.") from None
    raise IclevrError(f"Objects must be SceneObject or dict, got {type(obj).__name__}.")


def parse_size(size: str | int | Sequence[int]) -> tuple[int, int]:
    """64 -> (64, 64); '320x240' -> (320, 240) as (width, height)."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        w, h = size
    elif isinstance(size, int) and not isinstance(size, bool):
        w = h = size
    elif isinstance(size, str):
        text = size.strip().lower()
        parts = text.split("x")
        try:
            if len(parts) == 1:
                w = h = int(parts[0])
            elif len(parts) == 2:
                w, h = int(parts[0]), int(parts[1])
            else:
                raise ValueError
        except ValueError:
            raise IclevrError(
                f"--size '{size}' is not a size; use one number (64) or WIDTHxHEIGHT (320x240)."
            ) from None
    else:
        raise IclevrError(f"--size {size!r} is not a size; use one number (64) or WIDTHxHEIGHT (320x240).")
    if not (isinstance(w, int) and isinstance(h, int)) or not (8 <= w <= MAX_SIZE and 8 <= h <= MAX_SIZE):
        raise IclevrError(f"--size {size} must have sides between 8 and {MAX_SIZE} pixels.")
    return w, h


def _normalize3(x, y, z):
    n = math.sqrt(x * x + y * y + z * z)
    return x / n, y / n, z / n


def _basis():
    """Camera forward, right and up unit vectors, and tan of half the horizontal field of view."""
    f = _normalize3(*(LOOK_AT[i] - CAMERA[i] for i in range(3)))
    right = _normalize3(f[1], -f[0], 0.0)  # f x up, with up = +z
    up = (right[1] * f[2] - right[2] * f[1], right[2] * f[0] - right[0] * f[2], right[0] * f[1] - right[1] * f[0])
    return f, right, up, math.tan(math.radians(HFOV_DEG) / 2)


def project(x, y, z):
    """World points -> (u, v, depth); u and v run over [-1, 1] across the frame (v up). Works on
    floats and on numpy arrays."""
    f, right, up, tan_h = _basis()
    p = (x - CAMERA[0], y - CAMERA[1], z - CAMERA[2])
    depth = p[0] * f[0] + p[1] * f[1] + p[2] * f[2]
    u = (p[0] * right[0] + p[1] * right[1] + p[2] * right[2]) / depth / tan_h
    v = (p[0] * up[0] + p[1] * up[1] + p[2] * up[2]) / depth / (tan_h / FRAME_ASPECT)
    return u, v, depth


def in_frame(obj: SceneObject, margin: float = 0.03) -> bool:
    """Whether the object lies fully inside the frame (its bounding box's corners do)."""
    xs, ys, zs = _box_corners(np.array([obj.x]), np.array([obj.y]), np.array([obj.radius]))
    u, v, depth = project(xs, ys, zs)
    return bool((depth > 0.1).all() and (np.abs(u) <= 1 - margin).all() and (np.abs(v) <= 1 - margin).all())


def _box_corners(x, y, r):
    """The 8 corners of each object's axis-aligned bounding box: three (M, 8) arrays."""
    sx = np.array([-1, 1, -1, 1, -1, 1, -1, 1], dtype=np.float64)
    sy = np.array([-1, -1, 1, 1, -1, -1, 1, 1], dtype=np.float64)
    top = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.float64)
    return x[:, None] + sx * r[:, None], y[:, None] + sy * r[:, None], top * 2 * r[:, None]


# ----------------------------------------------------------------------------------- intersections
# Each returns the ray parameter t of the first hit beyond EPS, or INF; all arguments broadcast.


def _hit_sphere(torch, ox, oy, oz, dx, dy, dz, cx, cy, r):
    px, py, pz = ox - cx, oy - cy, oz - r
    b = px * dx + py * dy + pz * dz
    c = px * px + py * py + pz * pz - r * r
    disc = b * b - c
    s = torch.sqrt(torch.clamp(disc, min=0))
    t0, t1 = -b - s, -b + s
    t = torch.where(t0 > EPS, t0, t1)
    return torch.where((disc > 0) & (t > EPS), t, INF)


def _safe(torch, d):
    return torch.where(d.abs() < 1e-12, 1e-12, d)


def _hit_cube(torch, ox, oy, oz, dx, dy, dz, cx, cy, h, cos, sin):
    px, py, pz = ox - cx, oy - cy, oz - h
    lx, ly = cos * px + sin * py, cos * py - sin * px  # into the cube's frame
    ldx, ldy = cos * dx + sin * dy, cos * dy - sin * dx
    near = far = None
    for o, d in ((lx, ldx), (ly, ldy), (pz, dz)):
        d = _safe(torch, d)
        t1, t2 = (-h - o) / d, (h - o) / d
        lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
        near = lo if near is None else torch.maximum(near, lo)
        far = hi if far is None else torch.minimum(far, hi)
    t = torch.where(near > EPS, near, far)
    return torch.where((near <= far) & (far > EPS), t, INF)


def _hit_cylinder(torch, ox, oy, oz, dx, dy, dz, cx, cy, r):
    px, py, pz = ox - cx, oy - cy, oz - r  # half height = radius
    a = _safe(torch, dx * dx + dy * dy)
    b = px * dx + py * dy
    c = px * px + py * py - r * r
    disc = b * b - a * c
    ts = (-b - torch.sqrt(torch.clamp(disc, min=0))) / a
    zs = pz + ts * dz
    side = torch.where((disc > 0) & (ts > EPS) & (zs.abs() <= r), ts, INF)
    tc = (r - pz) / _safe(torch, dz)
    qx, qy = px + tc * dx, py + tc * dy
    cap = torch.where((tc > EPS) & (qx * qx + qy * qy <= r * r), tc, INF)
    return torch.minimum(side, cap)


def _intersect(torch, obj, rows, origin, d):
    """t of each object in `rows` against its own rays: origin and d broadcast to (M, K)."""
    shape = obj["shape"][rows]
    k = max(x.shape[-1] if x.dim() else 1 for x in (*origin, *d))
    t = torch.full((len(rows), k), INF)
    for code, name in enumerate(SHAPES):
        sel = torch.nonzero(shape == code).flatten()
        if sel.numel() == 0:
            continue
        c = {k: v[rows[sel]].unsqueeze(1) for k, v in obj.items()}
        o = [x[sel] if x.dim() == 2 and x.shape[0] > 1 else x for x in origin]
        dd = [x[sel] if x.dim() == 2 and x.shape[0] > 1 else x for x in d]
        if name == "sphere":
            t[sel] = _hit_sphere(torch, *o, *dd, c["x"], c["y"], c["r"])
        elif name == "cube":
            t[sel] = _hit_cube(torch, *o, *dd, c["x"], c["y"], c["h"], c["cos"], c["sin"])
        else:
            t[sel] = _hit_cylinder(torch, *o, *dd, c["x"], c["y"], c["r"])
    return t
