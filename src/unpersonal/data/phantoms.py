"""Seeded procedural "phantom" chest X-rays with known patient identities.

Why this exists: unpersonal needs demo data that anyone can generate offline, and tests need data
whose ground truth is known exactly. Real chest X-rays cannot ship with the tool, so we draw them:

* every patient gets a fixed anatomy (body outline, lungs, ribs, spine, heart, clavicles and a
  low-frequency texture), so a re-identification network has something stable to learn;
* every scan of that patient re-renders the same anatomy under a slightly different pose, exposure,
  noise and blur, so scans of one patient are similar but never identical;
* a patient may carry a "finding" (a soft lung opacity), giving a learnable binary label; with
  ``findings`` > 1 each patient may carry any of several kinds at once (an opacity, a dense
  nodule, a basal effusion, an apical shadow), giving multi-label data.

All randomness for patient ``k`` comes from a generator seeded by ``(seed, k)``, so patient ``k``
looks the same however many patients are generated. The anatomy is described in continuous
coordinates on ``[-1, 1]^2`` and rendered by evaluating it on a (pose-transformed) pixel grid, so
the same patient renders at any resolution. Only numpy is used, so this module imports fast.

Orientation follows a displayed PA chest X-ray: the patient's left is on the image's right, so
the heart sits right of centre; ``y`` grows downwards (row order), ``x`` to the right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FINDINGS", "PhantomSet", "generate_phantoms"]

# Attenuation along a ray, in units of the full soft-tissue thickness (1.0): lung air removes
# some of it, bone, heart and mediastinum add to it. Only their ratios matter for the look.
_SOFT_TISSUE = 1.0
_LUNG_AIR = 0.75
_BONE = 0.5
_HEART = 0.12
_MEDIASTINUM = 0.15
# Scale from attenuation to displayed brightness (1 - exp(-k * attenuation)).
_DISPLAY_K = 0.95
# Number of sinusoids in a patient's texture field: enough to look irregular, few enough to be fast.
_TEXTURE_WAVES = 10


@dataclass(frozen=True)
class PhantomSet:
    """A generated dataset: one row per scan, ordered by patient then scan.

    images: uint8 ``[N, H, W]`` displayed chest X-rays (bright = dense), ``H == W == resolution``.
    label: int64 ``[N]``, 1 when the patient carries the finding, 0 when normal; with several
    findings ``[N, F]``, one column per kind of `FINDINGS`.
    patient_id: fixed-width unicode ``[N]``, e.g. ``"phantom-0007"``.
    """

    images: np.ndarray
    label: np.ndarray
    patient_id: np.ndarray


@dataclass(frozen=True)
class _Lung:
    """One lung field in anatomy coordinates; ``side`` is -1 (image left) or +1 (image right)."""

    side: float
    cx: float
    cy: float
    half_width: float
    half_height: float
    apex_taper: float  # how much narrower the apex is than the base (0 = no taper)
    exponent: float  # superellipse exponent: 2 = ellipse, larger = boxier
    dome: float  # how far the diaphragm dome bulges up into the lung base
    darkness: float  # multiplies the air contrast, so lungs differ in density


@dataclass(frozen=True)
class _Ribs:
    """Posterior ribs on one side, drawn as arcs that drop as they run laterally."""

    side: float
    count: int
    first_y: float
    spacing: float
    spacing_growth: float  # lower ribs are spaced further apart, as in real chests
    curvature: float
    thickness: float
    lateral_extent: float
    lowest_y: float  # ribs fade out below the lung bases, where the abdomen starts


@dataclass(frozen=True)
class _Anatomy:
    """Everything fixed about one patient: the part a re-identification model should learn."""

    body_half_width: float
    body_half_height: float
    body_cy: float
    body_exponent: float
    neck_half_width: float
    lungs: tuple[_Lung, _Lung]
    ribs: tuple[_Ribs, _Ribs]
    spine_x: float
    spine_half_width: float
    mediastinum_half_width: float
    vertebra_period: float
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    heart_tilt: float
    clavicle_y: float
    clavicle_slope: float
    clavicle_bend: float
    clavicle_length: float
    texture_freqs: np.ndarray  # [K, 2] cycles per unit along x and y
    texture_phases: np.ndarray  # [K]
    texture_amps: np.ndarray  # [K]
    texture_strength: float


@dataclass(frozen=True)
class _Finding:
    """A patient's soft opacity: where it sits and how strong it is on each scan."""

    cx: np.ndarray  # [S] per-scan centre (patient-fixed centre plus small jitter)
    cy: np.ndarray  # [S]
    radius: float
    intensity: np.ndarray  # [S]


@dataclass(frozen=True)
class _FindingKind:
    """Where in a lung a kind of finding sits and how it looks (lung-local coordinates: u across
    the lung's half-width, v down its half-height, -1 at the apex, +1 at the base)."""

    name: str
    u: tuple[float, float]
    v: tuple[float, float]
    radius: tuple[float, float]
    intensity: tuple[float, float]


# The first is the binary demo's finding; the others differ in size, density and place, so a
# small classifier can tell each apart at 32 px. The opacity is large and dense enough (5-7 px
# across at 32 px) that the demo's short diffusion training learns to draw it: at radius
# 0.10-0.16 and density 0.40-0.55 a real classifier still learned it (validation ROC-AUC 0.94),
# but the demo's generator drew it on a third of its attempts and its release taught 7 to 11
# points less (BENCHMARKS.md, "A finding the demo's generator can learn").
FINDINGS = (
    _FindingKind("opacity", (-0.5, 0.5), (0.05, 0.55), (0.16, 0.22), (0.6, 0.8)),
    _FindingKind("nodule", (-0.4, 0.4), (-0.45, 0.0), (0.05, 0.07), (0.9, 1.2)),
    _FindingKind("effusion", (-0.3, 0.3), (0.85, 1.0), (0.17, 0.22), (0.6, 0.8)),
    _FindingKind("apical", (-0.3, 0.3), (-0.7, -0.5), (0.1, 0.14), (0.8, 1.0)),
)


@dataclass(frozen=True)
class _ScanConditions:
    """Per-scan acquisition differences, each an array over the patient's S scans."""

    rotation: np.ndarray  # radians
    shift_x: np.ndarray
    shift_y: np.ndarray
    scale: np.ndarray
    gain: np.ndarray
    offset: np.ndarray
    gamma: np.ndarray
    blur: np.ndarray  # weight of a 3-tap blur mixed into the image
    noise_sigma: np.ndarray


def generate_phantoms(
    n_patients: int,
    resolution: int,
    seed: int,
    scans_per_patient: tuple[int, int] = (1, 6),
    finding_rate: float = 0.4,
    findings: int = 1,
) -> PhantomSet:
    """Generate ``n_patients`` phantom patients, ordered by patient then scan.

    Each patient has between ``scans_per_patient[0]`` and ``scans_per_patient[1]`` scans
    (inclusive) and carries each of the first ``findings`` kinds of `FINDINGS` with probability
    ``finding_rate``, independently. One finding gives a binary label ``[N]``, several a
    multi-label ``[N, findings]``; the first kind is drawn from the same stream either way, so
    one-finding sets are unchanged by the option.

    Patient ``k`` depends only on ``(seed, k)`` (its scans also on ``scans_per_patient`` and
    ``resolution``), never on ``n_patients``, so a small set is a prefix of a large one. Anatomy,
    finding and scan conditions come from separate streams, so changing ``finding_rate`` only adds
    or removes opacities and changing ``scans_per_patient`` leaves each patient's anatomy alone.

    Raises ValueError for arguments outside the documented ranges.
    """
    _check_arguments(n_patients, resolution, seed, scans_per_patient, finding_rate)
    if not _is_int(findings) or not 1 <= findings <= len(FINDINGS):
        raise ValueError(f"findings must be an integer from 1 to {len(FINDINGS)}, got {findings!r}")
    grid_y, grid_x = _pixel_grid(resolution)
    images: list[np.ndarray] = []
    labels: list[list[int]] = []
    ids: list[str] = []
    for k in range(n_patients):
        anatomy_rng, finding_rng, scan_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence([seed, k]).spawn(3)
        )
        anatomy = _draw_anatomy(anatomy_rng)
        n_scans = int(scan_rng.integers(scans_per_patient[0], scans_per_patient[1] + 1))
        conditions = _draw_scan_conditions(scan_rng, n_scans)
        # Kind 0 from the patient's own finding stream, kind j > 0 from a stream of its own.
        drawn = [_draw_finding(finding_rng if j == 0 else
                               np.random.default_rng(np.random.SeedSequence([seed, k, j])),
                               anatomy, n_scans, finding_rate, FINDINGS[j])
                 for j in range(findings)]
        scans = _render_patient(
            anatomy, [finding for present, finding in drawn if present], conditions, grid_x,
            grid_y, scan_rng
        )
        images.append(scans)
        labels.extend([[int(present) for present, _ in drawn]] * n_scans)
        ids.extend([f"phantom-{k:04d}"] * n_scans)
    label = np.asarray(labels, dtype=np.int64)
    return PhantomSet(
        images=np.concatenate(images, axis=0),
        label=label[:, 0] if findings == 1 else label,
        patient_id=np.asarray(ids, dtype=str),
    )


def _check_arguments(
    n_patients: int,
    resolution: int,
    seed: int,
    scans_per_patient: tuple[int, int],
    finding_rate: float,
) -> None:
    """Reject arguments that would silently produce an empty or meaningless dataset."""
    if not _is_int(n_patients) or n_patients < 1:
        raise ValueError(f"n_patients must be an integer >= 1, got {n_patients!r}")
    if not _is_int(resolution) or resolution < 16:
        raise ValueError(f"resolution must be an integer >= 16 pixels, got {resolution!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        not isinstance(scans_per_patient, (tuple, list))
        or len(scans_per_patient) != 2
        or not all(_is_int(v) for v in scans_per_patient)
        or not 1 <= scans_per_patient[0] <= scans_per_patient[1]
    ):
        raise ValueError(
            "scans_per_patient must be (min, max) integers with 1 <= min <= max, "
            f"got {scans_per_patient!r}"
        )
    is_number = isinstance(finding_rate, (int, float, np.integer, np.floating))
    if not is_number or isinstance(finding_rate, bool) or not 0.0 <= finding_rate <= 1.0:
        raise ValueError(f"finding_rate must be between 0 and 1, got {finding_rate!r}")


def _is_int(value: object) -> bool:
    """True for Python and numpy integers but not bools, which are ints by accident of history."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates on [-1, 1]^2, so anatomy is resolution independent."""
    centres = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution) * 2.0 - 1.0
    return centres[:, None], centres[None, :]


# --------------------------------------------------------------------------------------------
# Drawing the patient: every number here is a between-patient difference.
# --------------------------------------------------------------------------------------------


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one patient's fixed anatomy; ranges are wide so patients differ clearly."""
    lung_scale = rng.uniform(0.85, 1.15)  # big and small chests
    lungs = (_draw_lung(rng, -1.0, lung_scale), _draw_lung(rng, +1.0, lung_scale))
    lung_top = min(lung.cy - lung.half_height for lung in lungs)
    ribs = _draw_ribs(rng, lungs)
    freqs, phases, amps = _draw_texture(rng)
    return _Anatomy(
        body_half_width=rng.uniform(0.74, 0.97),
        body_half_height=rng.uniform(1.0, 1.25),
        body_cy=rng.uniform(0.05, 0.25),
        body_exponent=rng.uniform(2.6, 4.5),
        neck_half_width=rng.uniform(0.14, 0.22),
        lungs=lungs,
        ribs=ribs,
        spine_x=rng.uniform(-0.04, 0.04),
        spine_half_width=rng.uniform(0.055, 0.085),
        mediastinum_half_width=rng.uniform(0.09, 0.14),
        vertebra_period=rng.uniform(0.1, 0.14),
        heart_cx=rng.uniform(0.06, 0.17),
        heart_cy=rng.uniform(0.2, 0.32),
        heart_rx=rng.uniform(0.24, 0.33),
        heart_ry=rng.uniform(0.18, 0.25),
        heart_tilt=rng.uniform(-0.5, 0.0),
        clavicle_y=lung_top + rng.uniform(0.02, 0.1),
        clavicle_slope=rng.uniform(0.0, 0.15),
        clavicle_bend=rng.uniform(0.0, 0.3),
        clavicle_length=rng.uniform(0.5, 0.7),
        texture_freqs=freqs,
        texture_phases=phases,
        texture_amps=amps,
        texture_strength=rng.uniform(0.06, 0.11),
    )


def _draw_lung(rng: np.random.Generator, side: float, scale: float) -> _Lung:
    """Draw one lung; each side gets its own jitter so lungs are asymmetric per patient."""
    return _Lung(
        side=side,
        cx=side * rng.uniform(0.31, 0.39),
        cy=rng.uniform(-0.14, 0.0),
        half_width=scale * rng.uniform(0.22, 0.3),
        half_height=scale * rng.uniform(0.5, 0.62),
        apex_taper=rng.uniform(0.2, 0.45),
        exponent=rng.uniform(2.0, 3.2),
        dome=rng.uniform(0.05, 0.25),
        darkness=rng.uniform(0.8, 1.1),
    )


def _draw_ribs(rng: np.random.Generator, lungs: tuple[_Lung, _Lung]) -> tuple[_Ribs, _Ribs]:
    """Draw a rib cage that fits the lungs: one shared pattern, small left/right differences."""
    rib_spacing = rng.uniform(0.12, 0.17)
    rib_curvature = rng.uniform(0.25, 0.75)
    rib_thickness = rng.uniform(0.018, 0.032)
    lung_top = min(lung.cy - lung.half_height for lung in lungs)
    lung_base = max(lung.cy + lung.half_height for lung in lungs)
    first_rib_y = lung_top - rng.uniform(0.0, 0.12)
    # Enough ribs to cover the lungs, give or take one, so the count is patient specific.
    rib_count = int(round((lung_base - first_rib_y) / rib_spacing)) + int(rng.integers(-1, 2))

    def one_side(lung: _Lung) -> _Ribs:
        return _Ribs(
            side=lung.side,
            count=rib_count,
            first_y=first_rib_y + rng.uniform(-0.03, 0.03),
            spacing=rib_spacing * rng.uniform(0.96, 1.04),
            spacing_growth=rng.uniform(0.0, 0.06),
            curvature=rib_curvature * rng.uniform(0.9, 1.1),
            thickness=rib_thickness,
            lateral_extent=lung.cx * lung.side + lung.half_width + rng.uniform(0.04, 0.12),
            lowest_y=lung_base + 0.08,
        )

    left = one_side(lungs[0])  # a separate statement fixes the order of the random draws
    return left, one_side(lungs[1])


def _draw_texture(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random plane waves whose sum is the patient's lung texture ("fingerprint")."""
    magnitude = rng.uniform(1.0, 3.5, size=_TEXTURE_WAVES)
    direction = rng.uniform(0.0, np.pi, size=_TEXTURE_WAVES)
    freqs = np.stack([magnitude * np.cos(direction), magnitude * np.sin(direction)], axis=1)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=_TEXTURE_WAVES)
    amps = rng.uniform(0.5, 1.0, size=_TEXTURE_WAVES)
    amps = amps / np.sqrt(0.5 * np.sum(amps**2))  # unit standard deviation for the sum
    return freqs, phases, amps


def _draw_finding(
    rng: np.random.Generator, anatomy: _Anatomy, n_scans: int, finding_rate: float,
    kind: _FindingKind,
) -> tuple[bool, _Finding]:
    """Decide whether the patient has a finding of this kind and where it sits in which lung.

    The location is drawn even for normal patients so that the random stream, and hence the rest
    of the patient, does not depend on ``finding_rate``.
    """
    has_finding = bool(rng.uniform() < finding_rate)
    lung = anatomy.lungs[int(rng.integers(0, 2))]
    u = rng.uniform(*kind.u)  # lung-local position: stay well inside the field
    v = rng.uniform(*kind.v)
    cx = lung.cx + u * lung.half_width
    cy = lung.cy + v * lung.half_height
    finding = _Finding(
        cx=cx + rng.normal(0.0, 0.015, size=n_scans),
        cy=cy + rng.normal(0.0, 0.015, size=n_scans),
        radius=rng.uniform(*kind.radius),
        intensity=rng.uniform(*kind.intensity) * rng.uniform(0.75, 1.25, size=n_scans),
    )
    return has_finding, finding


def _draw_scan_conditions(rng: np.random.Generator, n_scans: int) -> _ScanConditions:
    """Draw per-scan pose and exposure; all deliberately smaller than between-patient spread."""
    return _ScanConditions(
        rotation=np.deg2rad(rng.uniform(-3.0, 3.0, size=n_scans)),
        shift_x=rng.uniform(-0.04, 0.04, size=n_scans),
        shift_y=rng.uniform(-0.04, 0.04, size=n_scans),
        scale=rng.uniform(0.95, 1.05, size=n_scans),
        gain=rng.uniform(0.9, 1.1, size=n_scans),
        offset=rng.uniform(-0.04, 0.04, size=n_scans),
        gamma=rng.uniform(0.85, 1.15, size=n_scans),
        blur=rng.uniform(0.0, 0.6, size=n_scans),
        noise_sigma=rng.uniform(0.008, 0.025, size=n_scans),
    )


# --------------------------------------------------------------------------------------------
# Rendering: vectorised over all scans of one patient ([S, H, W] arrays).
# --------------------------------------------------------------------------------------------


def _render_patient(
    anatomy: _Anatomy,
    findings: list[_Finding],
    conditions: _ScanConditions,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Render all scans of one patient as uint8 ``[S, H, W]``."""
    resolution = grid_x.shape[1]
    x, y = _pose_grid(grid_x, grid_y, conditions)
    # Soft edges about a pixel wide (in anatomy units) avoid aliasing at low resolution.
    edge = np.float32(max(0.012, 1.2 / resolution))
    attenuation = _attenuation(anatomy, findings, x, y, edge, resolution)
    brightness = 1.0 - np.exp(np.float32(-_DISPLAY_K) * attenuation)
    brightness = _blur_rows_and_columns(brightness, conditions.blur)
    brightness = _expose(brightness, conditions)
    noise = noise_rng.standard_normal(brightness.shape, dtype=np.float32)
    brightness = brightness + noise * _per_scan(conditions.noise_sigma)
    return np.clip(brightness * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def _per_scan(values: np.ndarray) -> np.ndarray:
    """Reshape a per-scan vector to broadcast against ``[S, H, W]`` images."""
    return values.astype(np.float32)[:, None, None]


def _pose_grid(
    grid_x: np.ndarray, grid_y: np.ndarray, conditions: _ScanConditions
) -> tuple[np.ndarray, np.ndarray]:
    """Map each output pixel back into anatomy coordinates for each scan's pose.

    Transforming the grid instead of resampling an image keeps edges sharp and costs nothing.
    """
    cos_r = _per_scan(np.cos(conditions.rotation))
    sin_r = _per_scan(np.sin(conditions.rotation))
    dx = (grid_x - _per_scan(conditions.shift_x)) / _per_scan(conditions.scale)
    dy = (grid_y - _per_scan(conditions.shift_y)) / _per_scan(conditions.scale)
    return cos_r * dx + sin_r * dy, cos_r * dy - sin_r * dx


def _attenuation(
    anatomy: _Anatomy,
    findings: list[_Finding],
    x: np.ndarray,
    y: np.ndarray,
    edge: np.float32,
    resolution: int,
) -> np.ndarray:
    """Sum the tissue, air and bone contributions along each ray (bright = dense)."""
    body = _body_mask(anatomy, x, y, edge)
    heart = _heart_mask(anatomy, x, y, edge)
    lungs = [_lung_mask(lung, x, y, edge) for lung in anatomy.lungs]
    # The heart sits in front of the lung, so it replaces air where they overlap.
    air = sum(lung.darkness * mask for lung, mask in zip(anatomy.lungs, lungs)) * (1.0 - heart)
    lung_area = np.maximum(lungs[0], lungs[1])
    texture = _texture(anatomy, x, y, resolution)
    attenuation = body * (_SOFT_TISSUE + 0.35 * anatomy.texture_strength * texture)
    attenuation -= _LUNG_AIR * air * (1.0 - anatomy.texture_strength * texture)
    attenuation += _HEART * heart + _MEDIASTINUM * body * _mediastinum(anatomy, x, edge)
    attenuation += _BONE * body * (
        _spine(anatomy, x, y, edge)
        + 0.6 * _ribs(anatomy, x, y, edge, resolution)
        + 0.8 * _clavicles(anatomy, x, y, resolution)
    )
    for finding in findings:
        attenuation += lung_area * _opacity(finding, x, y)
    return attenuation


def _soft_inside(signed: np.ndarray, edge: np.float32) -> np.ndarray:
    """Smooth 0..1 membership from a signed value that is negative inside a shape."""
    return 0.5 - 0.5 * np.tanh(signed / edge)


def _body_mask(anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, edge: np.float32) -> np.ndarray:
    """Torso as a superellipse plus a neck column, so outside the body is black."""
    p = anatomy.body_exponent
    torso = (
        np.abs(x / anatomy.body_half_width) ** p
        + np.abs((y - anatomy.body_cy) / anatomy.body_half_height) ** p
    ) ** (1.0 / p) - 1.0
    neck = np.abs(x) - anatomy.neck_half_width
    return _soft_inside(np.minimum(torso * anatomy.body_half_width, neck), edge)


def _lung_mask(lung: _Lung, x: np.ndarray, y: np.ndarray, edge: np.float32) -> np.ndarray:
    """Tapered superellipse (narrow apex) cut from below by the diaphragm dome."""
    v = (y - lung.cy) / lung.half_height
    # Apex narrower than base: shrink the width towards the top (v = -1).
    width = lung.half_width * (1.0 - lung.apex_taper * np.clip(0.5 - 0.5 * v, 0.0, 1.0))
    u = (x - lung.cx) / width
    p = lung.exponent
    outline = (np.abs(u) ** p + np.abs(v) ** p) ** (1.0 / p) - 1.0
    # Diaphragm: the base rises towards the middle of the lung, leaving sharp costophrenic angles.
    dome = v - (1.0 - lung.dome * (1.0 - np.clip(u * u, 0.0, 1.0)))
    return _soft_inside(np.maximum(outline * lung.half_width, dome * lung.half_height), edge)


def _heart_mask(anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, edge: np.float32) -> np.ndarray:
    """Tilted ellipse right of centre (the patient's left), overlapping that lung's base."""
    cos_t, sin_t = np.cos(anatomy.heart_tilt), np.sin(anatomy.heart_tilt)
    dx, dy = x - anatomy.heart_cx, y - anatomy.heart_cy
    u = (cos_t * dx + sin_t * dy) / anatomy.heart_rx
    v = (cos_t * dy - sin_t * dx) / anatomy.heart_ry
    return _soft_inside((np.sqrt(u * u + v * v) - 1.0) * anatomy.heart_ry, edge)


def _mediastinum(anatomy: _Anatomy, x: np.ndarray, edge: np.float32) -> np.ndarray:
    """Soft-tissue column between the lungs (great vessels, trachea), denser than chest wall."""
    return _soft_inside(np.abs(x - anatomy.spine_x) - anatomy.mediastinum_half_width, 4 * edge)


def _spine(anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, edge: np.float32) -> np.ndarray:
    """Vertical bright band with faint vertebral banding."""
    band = _soft_inside(np.abs(x - anatomy.spine_x) - anatomy.spine_half_width, edge)
    vertebrae = 0.8 + 0.2 * np.cos(y * np.float32(2.0 * np.pi / anatomy.vertebra_period))
    return band * vertebrae


def _ribs(
    anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, edge: np.float32, resolution: int
) -> np.ndarray:
    """Posterior ribs: arcs that drop laterally, limited to the chest wall on each side."""
    total = np.zeros_like(x)
    for ribs in anatomy.ribs:
        lateral = x * ribs.side  # distance out from the midline on this side
        centre_offset = y - ribs.first_y - ribs.curvature * lateral * lateral
        # Rib phase t: integer t lies on a rib centre line; spacing grows slowly downwards.
        t = centre_offset / (ribs.spacing * (1.0 + ribs.spacing_growth * np.clip(y + 1.0, 0, 2)))
        index = np.clip(np.round(t), 0, ribs.count - 1)
        distance = (t - index) * ribs.spacing
        band = _antialiased_band(distance, ribs.thickness, resolution)
        on_side = _soft_inside(lateral - ribs.lateral_extent, edge) * _soft_inside(
            0.02 - lateral, edge
        )
        above_abdomen = _soft_inside(y - ribs.lowest_y, np.float32(0.05))
        total = total + band * on_side * above_abdomen
    return total


def _clavicles(anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, resolution: int) -> np.ndarray:
    """Two near-horizontal bones from the sternum out to the shoulders."""
    lateral = np.abs(x)
    centre = anatomy.clavicle_y - anatomy.clavicle_slope * lateral + anatomy.clavicle_bend * (
        lateral - 0.3
    ) ** 2
    band = _antialiased_band(y - centre, 0.028, resolution)
    extent = np.clip((lateral - 0.06) * 20.0, 0.0, 1.0) * np.clip(
        (anatomy.clavicle_length - lateral) * 20.0, 0.0, 1.0
    )
    return band * extent


def _antialiased_band(distance: np.ndarray, sigma: float, resolution: int) -> np.ndarray:
    """Gaussian line profile widened to at least a pixel, keeping its integral constant.

    Keeping the integral means thin bones fade into a smooth brightening at low resolution
    instead of aliasing into moire.
    """
    pixel = 2.0 / resolution
    effective = float(np.sqrt(sigma**2 + (0.5 * pixel) ** 2))
    return np.float32(sigma / effective) * np.exp(
        distance * distance * np.float32(-0.5 / effective**2)
    )


def _texture(anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, resolution: int) -> np.ndarray:
    """The patient's fixed low-frequency texture: a sum of plane waves, pre-filtered per pixel."""
    pixel = 2.0 / resolution
    total = np.zeros_like(x)
    for (fx, fy), phase, amp in zip(
        anatomy.texture_freqs, anatomy.texture_phases, anatomy.texture_amps
    ):
        # Attenuate waves near the pixel frequency (Gaussian pre-filter, sigma = half a pixel).
        angular = 2.0 * np.pi * np.hypot(fx, fy)
        damped = amp * np.exp(-0.5 * (angular * 0.5 * pixel) ** 2)
        wave = np.cos(x * np.float32(2.0 * np.pi * fx) + y * np.float32(2.0 * np.pi * fy) + phase)
        total = total + np.float32(damped) * wave
    return total


def _opacity(finding: _Finding, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Soft Gaussian opacity at the finding's per-scan position and strength."""
    dx = x - _per_scan(finding.cx)
    dy = y - _per_scan(finding.cy)
    falloff = np.exp((dx * dx + dy * dy) * np.float32(-0.5 / finding.radius**2))
    return _per_scan(finding.intensity) * falloff


# --------------------------------------------------------------------------------------------
# Acquisition: how the same anatomy differs from scan to scan.
# --------------------------------------------------------------------------------------------


def _blur_rows_and_columns(images: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Mix in a separable 3-tap box blur, per scan, to mimic slightly soft detectors."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = (padded[:, :-2, :] + padded[:, 1:-1, :] + padded[:, 2:, :]) / np.float32(3.0)
    blurred = (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]) / np.float32(3.0)
    w = _per_scan(weight)
    return images * (1.0 - w) + blurred * w


def _expose(brightness: np.ndarray, conditions: _ScanConditions) -> np.ndarray:
    """Apply per-scan gain, offset and gamma, as different exposures and windowing would."""
    exposed = np.clip(
        brightness * _per_scan(conditions.gain) + _per_scan(conditions.offset), 0.0, 1.0
    )
    return exposed ** _per_scan(conditions.gamma)
