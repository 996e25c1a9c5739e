"""Synthetic head-like CT phantoms: the project's embedded default dataset.

Every case is an analytic head in an *anatomical frame* (mm, LPS axes: +x patient left,
+y posterior, +z superior; origin near the centre of the cranium) that is posed into the world
(random rotation, scale and translation) and sampled on a voxel grid with varied spacing
(isotropic and thick-slice), storage orientation (LPS, RAS, LPI, permuted, oblique) and
intensity (noise, smooth bias field, scale/offset). Because the image is made by evaluating the
analytic head at the world position of every voxel centre, the landmarks written in world LPS
mm sit exactly where the voxel structure is.

The phantom plants the difficulties the method is about:

* ``ear_l`` / ``ear_r`` have identical (mirrored) local structure: an air canal ending in
  dense bone. Only global context (the handedness of face vs. skull vs. spine) tells them apart.
* ``chin`` and ``occ_bone`` form the correlated group, annotated the way real annotators do it
  (PDDCA: occ_bone is placed on the slice chosen for chin): on one common *key slice of the
  image*. The key axis is the axis of the canonical (LPS-reoriented, ``sitk.DICOMOrient``) image
  closest to the anatomical left-right direction — always canonical ``i`` here, since pose
  (<= 15 deg) plus oblique storage (<= 20 deg) stay below 45 deg. The key slice is chin's
  continuous coordinate along that axis (chin is the anchor and sits on its structure);
  ``occ_bone`` is the point of the occipital ridge's centre line that lies on the key slice.
  Because each case's pose (and oblique storage) tilts the mid-sagittal plane against the image
  grid, that point slides along the ridge away from the midline (over 256 cases: median 6 mm,
  90 % < 19 mm, max 41 mm). Sliding along the curved ridge rather than moving in a straight
  line along the image axis keeps the point on bone (a straight move leaves the bone in ~4 %
  of cases). The ridge is lengthened where needed so that it always extends >= its radius
  + 3 mm past the point.
* ``occ_bone``'s ridge runs left-right along the back of the skull, so its local appearance
  hardly changes along the ridge (roughly the key-slice normal): only the group tells where
  it is.
* ``nasion`` lies on the anatomical mid-sagittal plane ``x = 0`` but is annotated on its own
  structure (the nasal bone), independent of chin's key slice: projected onto that slice it
  would move by a median 4 mm (max 30 mm) and leave the bone in ~40 % of cases.
  ``odont_proc`` (tip of the dens on the spine) is independent: the spine is off the midline by
  a per-case lateral offset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, NDArray

from landmark3d import __version__
from landmark3d.errors import OutputExistsError
from landmark3d.geometry.resample import canonical
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.io.atomic import publish_mode
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks

FloatArray = NDArray[np.float64]
F32 = NDArray[np.float32]
SDF = Callable[[F32, F32, F32], F32]

PHANTOM_LANDMARKS: tuple[str, ...] = ("nasion", "chin", "occ_bone", "ear_l", "ear_r", "odont_proc")
PLANTED_GROUP: tuple[str, ...] = ("chin", "occ_bone")
"""Landmarks annotated on one key slice of the canonical image (normal: the axis nearest L-R)."""
GROUP_ANCHOR = "chin"
"""The group member whose slice is the key slice (it stays on its structure point)."""
CANONICAL_AXIS_NAMES: tuple[str, ...] = ("L-R", "A-P", "S-I")
"""Anatomical direction of canonical (LPS) axes i, j, k."""
RIDGE_END_MARGIN_MM = 3.0
DESIGN_VERSION = 2
MAX_ROTATION_DEG = 15.0
AIR_HU = -1000.0

# Per-case variety cycles (deterministic by case index so small datasets still see them).
_STORAGE = ("LPS", "oblique", "RAS", "LPS", "permuted", "oblique", "LPS", "LPI")
_SLICE_RATIO = (1.0, 2.5, 1.0, 2.0 / 1.2, 1.25)  # k spacing / in-plane spacing
_RAS_LANDMARK_FILE = 2  # case index % 5 == this: landmark file written in RAS


# ------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class _Shape:
    """One painted structure: signed distance (mm, < 0 inside), value (HU), anatomical bbox."""

    sdf: SDF
    value: float
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]


def _vec(x: float, y: float, z: float) -> FloatArray:
    return np.array([x, y, z], dtype=np.float64)


def _box(c: ArrayLike, half: ArrayLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cc, hh = np.asarray(c, dtype=float), np.asarray(half, dtype=float)
    return tuple(map(float, cc - hh)), tuple(map(float, cc + hh))


def _ellipsoid(center: ArrayLike, axes: ArrayLike, value: float) -> _Shape:
    """Ellipsoid with a first-order signed-distance approximation ``(r - 1) / |grad r|``."""
    cx, cy, cz = (float(v) for v in np.asarray(center))
    ax, ay, az = (float(v) for v in np.asarray(axes))
    inv_amax = 1.0 / max(ax, ay, az)

    def f(x: F32, y: F32, z: F32) -> F32:
        qx, qy, qz = (x - cx) / ax, (y - cy) / ay, (z - cz) / az
        r = np.sqrt(qx * qx + qy * qy + qz * qz)
        g = np.sqrt((qx / ax) ** 2 + (qy / ay) ** 2 + (qz / az) ** 2) / np.maximum(r, 1e-6)
        return (r - 1.0) / np.maximum(g, inv_amax)

    lo, hi = _box((cx, cy, cz), (ax, ay, az))
    return _Shape(f, value, lo, hi)  # type: ignore[arg-type]


def _capsule(p0: ArrayLike, p1: ArrayLike, radius: float, value: float) -> _Shape:
    """Segment p0-p1 swept by a sphere of ``radius`` mm (p0 != p1)."""
    a, b = np.asarray(p0, dtype=float), np.asarray(p1, dtype=float)
    ax_, ay_, az_ = (float(v) for v in a)
    dx, dy, dz = (float(v) for v in b - a)
    inv_len2 = 1.0 / (dx * dx + dy * dy + dz * dz)

    def f(x: F32, y: F32, z: F32) -> F32:
        px, py, pz = x - ax_, y - ay_, z - az_
        t = np.clip((px * dx + py * dy + pz * dz) * inv_len2, 0.0, 1.0)
        ex, ey, ez = px - t * dx, py - t * dy, pz - t * dz
        return np.sqrt(ex * ex + ey * ey + ez * ez) - radius

    lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
    return _Shape(f, value, tuple(map(float, lo)), tuple(map(float, hi)))  # type: ignore[arg-type]


def _sphere(center: ArrayLike, radius: float, value: float) -> _Shape:
    return _ellipsoid(center, (radius, radius, radius), value)


def _zcylinder(cx: float, cy: float, r: float, z0: float, z1: float, value: float) -> _Shape:
    """Flat-ended cylinder along z from ``z0`` to ``z1``."""

    def f(x: F32, y: F32, z: F32) -> F32:
        radial = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r
        return np.maximum(radial, np.maximum(z0 - z, z - z1))

    return _Shape(f, value, (cx - r, cy - r, z0), (cx + r, cy + r, z1))


# ------------------------------------------------------------------------------ anatomy
def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Random per-case shape and intensity parameters of the head (mm and HU)."""
    u = rng.uniform
    g = u(0.92, 1.08)  # overall skull size +-8 %
    a, b, c = 46.0 * g * u(0.97, 1.03), 54.0 * g * u(0.97, 1.03), 50.0 * g * u(0.97, 1.03)
    bone = u(700.0, 1000.0)
    return {
        "a": a, "b": b, "c": c, "skull_t": u(4.0, 6.5), "scalp": u(4.0, 6.5),
        "hu_bone": bone, "hu_dense": bone + u(150.0, 300.0), "hu_soft": u(30.0, 55.0),
        "hu_brain": u(20.0, 40.0), "hu_csf": u(0.0, 12.0), "hu_fat": u(-110.0, -70.0),
        "hu_spine": u(300.0, 500.0),
        "zn": c * u(0.02, 0.18), "nasal_angle": np.deg2rad(u(25.0, 40.0)),
        "nasal_len": u(14.0, 20.0),
        "ye": b * u(-0.02, 0.12), "ze": -c * u(0.22, 0.36), "ear_depth": u(5.0, 8.0),
        "canal_r": u(2.8, 3.5),
        "zo": -c * u(0.15, 0.35), "ridge_r": u(4.0, 6.0), "ridge_l1": u(25.0, 40.0),
        "ridge_l2": u(25.0, 40.0),
        "yj": -b * u(0.22, 0.30), "ayj": b * u(0.45, 0.55), "axj": a * u(0.55, 0.65),
        "zj": -c - u(6.0, 12.0), "jaw_h": u(12.0, 16.0), "jaw_w": u(6.0, 8.0),
        "chin_r": u(4.0, 5.0),
        "sx": float(rng.choice([-1.0, 1.0])) * u(4.0, 10.0), "sy": b * u(0.05, 0.15),
        "dens_drop": u(2.0, 7.0), "dens_len": u(9.0, 13.0), "dens_r": u(4.0, 5.0),
    }  # fmt: skip


def _surface_x(p: dict[str, float], y: float, z: float) -> float:
    return p["a"] * float(np.sqrt(1.0 - (y / p["b"]) ** 2 - (z / p["c"]) ** 2))


def _ridge_radii(p: dict[str, float]) -> tuple[float, float]:
    """Half-axes (x, y) in mm of the ellipse ``skull surface at z = zo`` (the ridge centre line)."""
    f = float(np.sqrt(1.0 - (p["zo"] / p["c"]) ** 2))
    return p["a"] * f, p["b"] * f


def ridge_point(p: dict[str, float], phi: float) -> FloatArray:
    """Point of the occipital ridge centre line at angle ``phi`` (rad; 0 = midline), anatomical mm.

    The centre line is the skull's outer surface at ``z = zo``:
    ``(A sin(phi), B cos(phi), zo)``, ``phi > 0`` towards the patient's left.
    """
    ra, rb = _ridge_radii(p)
    return np.array([ra * np.sin(phi), rb * np.cos(phi), p["zo"]], dtype=np.float64)


def anatomical_landmarks(p: dict[str, float]) -> dict[str, FloatArray]:
    """Landmark positions (the annotated truth) in the anatomical frame (mm).

    Keyed by :data:`PHANTOM_LANDMARKS`. ``occ_bone`` is the ridge point at angle
    ``p["occ_phi"]`` (0 = the midline, the default; :func:`sample_case` sets it so that the
    point lies on chin's key slice).
    """
    yn = -p["b"] * float(np.sqrt(1.0 - (p["zn"] / p["c"]) ** 2))
    xe = _surface_x(p, p["ye"], p["ze"]) - p["ear_depth"]
    bottom = -p["c"] * float(np.sqrt(1.0 - (p["sx"] / p["a"]) ** 2 - (p["sy"] / p["b"]) ** 2))
    pts: dict[str, tuple[float, ...]] = {
        "nasion": (0.0, yn, p["zn"]),
        "chin": (0.0, p["yj"] - p["ayj"], p["zj"] - p["jaw_h"] / 2.0),
        "occ_bone": tuple(ridge_point(p, p.get("occ_phi", 0.0))),
        "ear_l": (xe, p["ye"], p["ze"]),
        "ear_r": (-xe, p["ye"], p["ze"]),
        "odont_proc": (p["sx"], p["sy"], bottom - p["dens_drop"]),
    }
    return {n: np.array(pts[n], dtype=np.float64) for n in PHANTOM_LANDMARKS}


def _structures(p: dict[str, float]) -> list[_Shape]:
    """The head as an ordered list of painted shapes (later ones paint over earlier ones)."""
    a, b, c, t = p["a"], p["b"], p["c"], p["skull_t"]
    lm = anatomical_landmarks(p)
    soft, bone, dense = p["hu_soft"], p["hu_bone"], p["hu_dense"]
    shapes = [
        _zcylinder(0.0, 0.1 * b, 0.72 * a, -400.0, -0.4 * c, soft),  # neck
        _ellipsoid((0.0, -0.25 * b, -0.9 * c), (0.85 * a, 0.8 * b, 0.75 * c), soft),  # face
        _ellipsoid((0.0, 0.0, 0.0), (a + p["scalp"], b + p["scalp"], c + p["scalp"]), soft),
    ]
    nasion = lm["nasion"]
    ndir = np.array([0.0, -np.sin(p["nasal_angle"]), -np.cos(p["nasal_angle"])])
    shapes.append(_ellipsoid(nasion + 10.0 * ndir + (0.0, -3.0, 0.0), (9.0, 7.0, 14.0), soft))
    for side in (1.0, -1.0):  # auricles
        ear = lm["ear_l"] * (side, 1.0, 1.0)
        out = ear + _vec(side * (p["ear_depth"] + p["scalp"] + 3.0), 0.0, 0.0)
        shapes.append(_ellipsoid(out, (3.5, 11.0, 16.0), soft))
    skull = _ellipsoid((0.0, 0.0, 0.0), (a, b, c), bone)
    shapes.append(skull)
    zo, rr, l1, l2 = p["zo"], p["ridge_r"], p["ridge_l1"], p["ridge_l2"]

    def ridge(x: F32, y: F32, z: F32) -> F32:  # tube following the skull, running left-right
        tube = np.sqrt(skull.sdf(x, y, z) ** 2 + (z - zo) ** 2) - rr
        return np.maximum(np.maximum(tube, -y), np.maximum(x - l2, -l1 - x))

    shapes.append(_Shape(ridge, bone, (-l1, 0.0, zo - rr - 1), (l2, b + rr + 1, zo + rr + 1)))
    shapes.append(_ellipsoid((0.0, 0.0, 0.0), (a - t, b - t, c - t), p["hu_brain"]))
    for side in (1.0, -1.0):
        shapes.append(_ellipsoid((side * 6.5, 3.0, 10.0), (4.5, 17.0, 8.0), p["hu_csf"]))
    shapes.append(_zcylinder(0.0, p["sy"], 13.0, -c - 3.0, -c + t + 2.0, p["hu_brain"]))
    for side in (1.0, -1.0):  # orbits: fat with an eyeball inside
        eye = (side * 0.36 * a, 0.8 * nasion[1], p["zn"] - 12.0)
        shapes += [_sphere(eye, 10.0, p["hu_fat"]), _sphere(eye, 7.5, 15.0)]
    shapes.append(_capsule(nasion, nasion + p["nasal_len"] * ndir, 2.5, bone))
    yj, ayj, axj, zj, hb, wb = p["yj"], p["ayj"], p["axj"], p["zj"], p["jaw_h"], p["jaw_w"]

    def jaw(x: F32, y: F32, z: F32) -> F32:  # horseshoe band open posteriorly
        qx, qy = x / axj, (y - yj) / ayj
        r = np.sqrt(qx * qx + qy * qy)
        g = np.sqrt((qx / axj) ** 2 + (qy / ayj) ** 2) / np.maximum(r, 1e-6)
        radial = np.abs((r - 1.0) / np.maximum(g, 1.0 / max(axj, ayj))) - wb / 2.0
        band = np.maximum(radial, np.abs(z - zj) - hb / 2.0)
        return np.maximum(band, y - (yj + 0.2 * ayj))

    half = (axj + wb, ayj + wb, hb / 2.0 + 1.0)
    shapes.append(_Shape(jaw, bone, *_box((0.0, yj, zj), half)))  # type: ignore[arg-type]
    shapes.append(_sphere(lm["chin"], p["chin_r"], bone))
    dens_top = lm["odont_proc"]
    c2_top = float(dens_top[2]) - p["dens_len"]
    for m in range(4):  # vertebral bodies C2..C5
        z1 = c2_top - 16.0 * m
        shapes.append(_zcylinder(p["sx"], p["sy"], 9.0, z1 - 12.0, z1, p["hu_spine"]))
    dr = p["dens_r"]
    shapes.append(_capsule((p["sx"], p["sy"], c2_top - 3.0), dens_top - (0, 0, dr), dr, bone))
    shapes.append(_capsule((0.0, p["sy"] - 19.0, -c - 80.0), (0.0, p["sy"] - 19.0, -c - 8.0),
                           5.5, AIR_HU))  # fmt: skip
    for name, side in (("ear_l", 1.0), ("ear_r", -1.0)):  # dense bone pierced by an air canal
        ear = lm[name]
        shapes.append(_ellipsoid(ear - _vec(side * 3.0, 0.0, 0.0), (12.0, 8.0, 8.0), dense))
        shapes.append(_capsule(ear, ear + _vec(side * 30.0, 0.0, 0.0), p["canal_r"], AIR_HU))
    return shapes


def _paint(vol: F32, x: F32, y: F32, z: F32, shape: _Shape, edge_mm: float) -> None:
    """Blend ``shape.value`` into ``vol`` in place with a smooth (tanh) edge of ``edge_mm``."""
    m = 0.5 - 0.5 * np.tanh(shape.sdf(x, y, z) * np.float32(0.5 / edge_mm))
    vol += (np.float32(shape.value) - vol) * m


def anatomical_intensity(points: ArrayLike, anatomy: dict[str, float], edge_mm: float = 0.4) -> F32:
    """Noise-free phantom HU at anatomical-frame points, shape (..., 3) -> (...)."""
    pts = np.asarray(points, dtype=np.float32)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    vol = np.full(pts.shape[:-1], AIR_HU, dtype=np.float32)
    for shape in _structures(anatomy):
        _paint(vol, x, y, z, shape, edge_mm)
    return vol


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class PhantomCase:
    """Everything that defines one phantom case (all randomness drawn from ``(seed, index)``).

    Attributes:
        index: position of the case in the dataset (0-based).
        case_id: e.g. ``"case007"``.
        anatomy: shape/intensity parameters (mm, HU), see :func:`sample_anatomy`.
        anatomical_to_world: 4x4 affine, anatomical frame mm -> world LPS mm (pose).
        geometry: the image grid (world LPS).
        storage: orientation of the stored axes: LPS, RAS, LPI, permuted or oblique.
        key_axis: axis (0, 1, 2 = i, j, k) of the canonical LPS-reoriented image normal to the
            correlated group's key slice (the one nearest the anatomical left-right direction).
        key_normal: unit world (LPS) direction of that canonical axis, shape (3,).
        landmark_coords: coordinate system of the landmark file, "LPS" or "RAS".
        edge_mm: width of the smooth edges (mm).
        noise_hu, bias, scale, offset: intensity corruption (see :func:`render_case`).
    """

    index: int
    case_id: str
    anatomy: dict[str, float]
    anatomical_to_world: FloatArray
    geometry: Geometry
    storage: str
    key_axis: int
    key_normal: FloatArray
    landmark_coords: str
    edge_mm: float
    noise_hu: float
    bias: FloatArray  # (2, 3, 2): [multiplicative|additive][axis][linear, quadratic]
    scale: float
    offset: float

    @property
    def landmarks_anatomical(self) -> dict[str, FloatArray]:
        """The truth in the anatomical frame (mm); see :func:`anatomical_landmarks`."""
        return anatomical_landmarks(self.anatomy)

    def landmarks(self) -> LandmarkSet:
        """The truth in world LPS mm."""
        a = self.anatomical_to_world
        pts = np.stack([self.landmarks_anatomical[n] for n in PHANTOM_LANDMARKS])
        return LandmarkSet(list(PHANTOM_LANDMARKS), pts @ a[:3, :3].T + a[:3, 3])


def _rotation(axis: FloatArray, angle: float) -> FloatArray:
    """Rodrigues rotation matrix about unit ``axis`` by ``angle`` radians."""
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * kx + (1.0 - np.cos(angle)) * (kx @ kx)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> FloatArray:
    return _rotation(rng.normal(size=3), np.deg2rad(rng.uniform(-max_deg, max_deg)))


def _direction(kind: str, rng: np.random.Generator) -> FloatArray:
    if kind == "RAS":
        return np.diag([-1.0, -1.0, 1.0])
    if kind == "LPI":
        return np.diag([1.0, 1.0, -1.0])
    if kind == "permuted":  # coronal storage: i = L, j = S, k = A
        return np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    if kind == "oblique":  # tilted by 5..20 degrees about a random axis
        return _rotation(rng.normal(size=3), np.deg2rad(rng.uniform(5.0, 20.0)))
    return np.eye(3)


def canonical_direction(direction: ArrayLike) -> FloatArray:
    """Direction matrix (3x3, columns = world directions of i, j, k) after LPS reorientation.

    What :func:`landmark3d.geometry.resample.canonical` (``sitk.DICOMOrient``) gives an image
    with ``direction``: its axes permuted and flipped, still oblique for an oblique image.
    """
    dummy = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    dummy.SetDirection(tuple(float(v) for v in np.asarray(direction, dtype=np.float64).ravel()))
    return np.asarray(canonical(dummy).GetDirection(), dtype=np.float64).reshape(3, 3)


def _key_slice_angle(anat: dict[str, float], normal: FloatArray, anchor: FloatArray) -> float:
    """Angle ``phi`` of the ridge centre line point on the plane ``normal . (x - anchor) = 0``.

    All in the anatomical frame. On the centre line ``(A sin phi, B cos phi, zo)`` the plane
    condition reads ``R sin(phi + psi) = rhs``; of its roots, the posterior one (``cos phi > 0``)
    nearest the midline is returned. A plane missing the ridge (impossible with the pose ranges
    used here: the normal is within 35 deg of x) raises ValueError.
    """
    ra, rb = _ridge_radii(anat)
    rhs = float(normal @ anchor) - normal[2] * anat["zo"]
    r = float(np.hypot(normal[0] * ra, normal[1] * rb))
    psi = float(np.arctan2(normal[1] * rb, normal[0] * ra))
    if r <= abs(rhs):
        raise ValueError("the key slice does not cross the occipital ridge")
    base = float(np.arcsin(rhs / r))
    roots = [float(np.angle(np.exp(1j * (t - psi)))) for t in (base, np.pi - base)]
    posterior = [t for t in roots if np.cos(t) > 0.0]
    if not posterior:
        raise ValueError("the key slice crosses the skull only anteriorly")
    return min(posterior, key=abs)


def _annotate_on_key_slice(
    anat: dict[str, float], pose: FloatArray, direction: FloatArray
) -> tuple[int, FloatArray]:
    """Place ``occ_bone`` on chin's key slice (updates ``anat`` in place); returns the key axis.

    The key axis is the canonical image axis nearest the anatomical left-right direction; the
    plane ``key_normal . (w - chin_w) = 0`` (world) is ``(M^T key_normal) . (x - chin) = 0`` in
    the anatomical frame (``w = M x + t``). The ridge is lengthened on the side of the point, if
    needed, to extend ``ridge_r + RIDGE_END_MARGIN_MM`` past it.
    """
    canon = canonical_direction(direction)
    m = pose[:3, :3]
    left_right = m[:, 0] / np.linalg.norm(m[:, 0])
    axis = int(np.argmax(np.abs(canon.T @ left_right)))
    key_normal = canon[:, axis].copy()
    normal = m.T @ key_normal
    normal /= np.linalg.norm(normal)
    phi = _key_slice_angle(anat, normal, anatomical_landmarks(anat)[GROUP_ANCHOR])
    anat["occ_phi"] = phi
    x = float(ridge_point(anat, phi)[0])
    side = "ridge_l2" if x > 0 else "ridge_l1"  # the ridge spans x in [-l1, l2]
    anat[side] = max(anat[side], abs(x) + anat["ridge_r"] + RIDGE_END_MARGIN_MM)
    return axis, key_normal


def _f32(v: ArrayLike) -> FloatArray:
    """Round to float32-representable values (what NIfTI stores) so files match exactly."""
    return np.asarray(v, dtype=np.float32).astype(np.float64)


def sample_case(seed: int, index: int, size: int = 96) -> PhantomCase:
    """Draw case ``index`` of the phantom with ``seed`` (independent of the number of cases)."""
    rng = np.random.default_rng([seed, index, 0])
    anat = sample_anatomy(rng)
    a, b, c = anat["a"], anat["b"], anat["c"]
    pose = np.eye(4)
    pose[:3, :3] = _random_rotation(rng, MAX_ROTATION_DEG) * rng.uniform(0.9, 1.1)
    pose[:3, 3] = rng.uniform(-40.0, 40.0, size=3)
    storage = _STORAGE[index % len(_STORAGE)]
    direction = _direction(storage, rng)
    key_axis, key_normal = _annotate_on_key_slice(anat, pose, direction)
    # Field of view: the anatomical box of the head and upper neck, posed, in storage axes.
    lo = np.array([-a - 14.0, -b - 18.0, -c - 40.0])
    hi = np.array([a + 14.0, b + 10.0, c + 10.0])
    corners = np.array(
        [[(lo, hi)[s][d] for d, s in enumerate(bits)] for bits in np.ndindex(2, 2, 2)]
    )
    u = (corners @ pose[:3, :3].T + pose[:3, 3]) @ direction  # u = D^T world
    umin, umax = u.min(axis=0), u.max(axis=0)
    ratio = _SLICE_RATIO[index % len(_SLICE_RATIO)]
    n0 = round(size * rng.uniform(0.9, 1.1))
    ext = umax - umin
    sp = max(ext[0], ext[1], ext[2] / ratio) / (n0 - 1)
    spacing = _f32([sp, sp, sp * ratio])
    n = np.ceil(ext / spacing).astype(int) + 1
    u0 = (umin + umax) / 2.0 - (n - 1) / 2.0 * spacing
    geometry = Geometry(tuple(n), spacing, _f32(direction @ u0), direction)
    edge = 0.3 * float(np.prod(spacing)) ** (1.0 / 3.0)
    coords = "RAS" if index % 5 == _RAS_LANDMARK_FILE else "LPS"
    return PhantomCase(
        index=index, case_id=f"case{index:03d}", anatomy=anat, anatomical_to_world=pose, geometry=geometry,
        storage=storage, key_axis=key_axis, key_normal=key_normal, landmark_coords=coords,
        edge_mm=edge, noise_hu=rng.uniform(20.0, 40.0),
        bias=rng.uniform(-1.0, 1.0, size=(2, 3, 2)) * np.array([0.05, 15.0])[:, None, None],
        scale=rng.uniform(0.95, 1.05), offset=rng.uniform(-25.0, 25.0),
    )  # fmt: skip


def render_case(case: PhantomCase, seed: int = 0) -> Volume:
    """The CT-like image of ``case``: int16 HU in index order with its geometry.

    Each voxel value is the analytic head at the voxel centre's anatomical position (world ->
    inverse pose), then a smooth bias field, a per-case scale/offset and Gaussian noise (noise
    stream seeded from ``(seed, case index)``).
    """
    geo = case.geometry
    inv = np.linalg.inv(case.anatomical_to_world)
    m = (inv[:3, :3] @ geo.matrix).astype(np.float64)  # index -> anatomical
    b0 = inv[:3, :3] @ geo.origin + inv[:3, 3]
    m_inv = np.linalg.inv(m)
    vol = np.full(geo.size, AIR_HU, dtype=np.float32)
    margin = 10.0 * case.edge_mm
    for shape in _structures(case.anatomy):
        lo, hi = np.array(shape.lo) - margin, np.array(shape.hi) + margin
        box = np.array(
            [[(lo, hi)[s][d] for d, s in enumerate(bits)] for bits in np.ndindex(2, 2, 2)]
        )
        idx = (box - b0) @ m_inv.T
        i0 = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        i1 = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, geo.size)
        if np.any(i1 <= i0):
            continue
        ax = [np.arange(i0[d], i1[d], dtype=np.float32) for d in range(3)]
        grids = [ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]]
        x, y, z = (
            sum(np.float32(m[r, d]) * grids[d] for d in range(3)) + np.float32(b0[r])
            for r in range(3)
        )
        view = vol[i0[0] : i1[0], i0[1] : i1[1], i0[2] : i1[2]]
        _paint(view, x, y, z, shape, case.edge_mm)  # type: ignore[arg-type]
    # Smooth bias field in scanner (index) coordinates, quadratic per axis.
    field = [np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32)]
    for d, n in enumerate(geo.size):
        t = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        shape3 = [1, 1, 1]
        shape3[d] = n
        for f in range(2):
            lin, quad = case.bias[f, d]
            field[f] = field[f] + (np.float32(lin) * t + np.float32(quad) * t * t).reshape(shape3)
    vol = (vol - np.float32(AIR_HU)) * (np.float32(1.0) + field[0]) + np.float32(AIR_HU) + field[1]
    vol = vol * np.float32(case.scale) + np.float32(case.offset)
    rng = np.random.default_rng([seed, case.index, 1])
    vol += rng.standard_normal(size=geo.size, dtype=np.float32) * np.float32(case.noise_hu)
    arr = np.rint(np.clip(vol, -1024.0, 3071.0)).astype(np.int16)
    return Volume(arr, geo)  # type: ignore[arg-type]  # int16 HU, as CT is stored


# ------------------------------------------------------------------------------ dataset
def _folds(case_ids: list[str], seed: int, n_folds: int = 3) -> list[list[str]]:
    order = np.random.default_rng([seed, 7]).permutation(len(case_ids))
    return [sorted(case_ids[i] for i in order[f::n_folds]) for f in range(n_folds)]


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() or overwrite:
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise OutputExistsError(
        "the phantom output directory exists and is not empty.",
        path=out_dir,
        fix="pass --overwrite or choose another output directory.",
    )


def generate_phantom(
    out_dir: Path,
    n_cases: int = 30,
    seed: int = 0,
    size: int = 96,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a phantom dataset (images, landmark files, ``dataset.json``) to ``out_dir``.

    Args:
        out_dir: destination directory; built in a temporary sibling and renamed into place.
        n_cases: number of cases (>= 1); case ``k`` is the same whatever ``n_cases`` is.
        seed: all randomness derives from it; same seed -> identical voxels and landmark files.
        size: approximate number of voxels along the longest image axis (varied +-10 %).
        overwrite: replace an existing non-empty ``out_dir`` (else OutputExistsError).
        progress: called with the number of cases finished after each case.

    Returns:
        The path of ``out_dir / "dataset.json"``.
    """
    if n_cases < 1 or size < 16:
        raise ValueError(f"need n_cases >= 1 and size >= 16, got {n_cases} and {size}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    publish_mode(tmp)  # mkdtemp makes it owner-only (0700)
    try:
        (tmp / "images").mkdir()
        (tmp / "landmarks").mkdir()
        cases, frames, key_axes = [], {}, set()
        for index in range(n_cases):
            case = sample_case(seed, index, size)
            image, marks = f"images/{case.case_id}.nii.gz", f"landmarks/{case.case_id}.fcsv"
            sitk.WriteImage(render_case(case, seed).to_sitk(), str(tmp / image))
            write_landmarks(case.landmarks(), tmp / marks, coords=case.landmark_coords)
            cases.append({"id": case.case_id, "image": image, "landmarks": marks})
            frames[case.case_id] = case.anatomical_to_world.tolist()
            key_axes.add(case.key_axis)
            if progress is not None:
                progress(index + 1)
        if len(key_axes) != 1:  # cannot happen: pose + obliquity stay below 45 degrees
            raise RuntimeError(f"cases disagree on the key axis: {sorted(key_axes)}")
        axis = key_axes.pop()
        spec = {
            "name": "phantom",
            "modality": "CT",
            "landmarks": list(PHANTOM_LANDMARKS),
            "coordinate_system": "LPS",
            "cases": cases,
            "folds": _folds([c["id"] for c in cases], seed),
            "correlated_groups": [],
            "generator": {
                "tool": "landmark3d phantom", "version": __version__, "design": DESIGN_VERSION,
                "seed": seed, "cases": n_cases, "size": size,
                "planted_correlated_group": {
                    "landmarks": list(PLANTED_GROUP), "anchor": GROUP_ANCHOR,
                    "axis": "ijk"[axis], "axis_name": CANONICAL_AXIS_NAMES[axis],
                    "key_slice": "anchor's continuous index along the axis of the canonical "
                                 "(LPS-reoriented) image; the other members lie on it",
                },
                "anatomical_to_world": frames,
            },
        }  # fmt: skip
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        _check_out_dir(out_dir, overwrite)  # re-check: something may have appeared meanwhile
        trash = None
        if out_dir.exists() or out_dir.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out_dir / "dataset.json"
