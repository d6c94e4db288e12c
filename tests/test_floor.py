"""The calibrated distance floor: held-out images set it, planted copies fall under it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unpersonal.errors import UserError
from unpersonal.privacy.floor import AlignedPixels, DistanceFloor, floor_from_distances
from unpersonal.privacy.knn import NeighbourIndex


def population(count: int, seed: int, dim: int = 16) -> np.ndarray:
    """Draws from one fixed distribution (same centres for every seed): train and held-out alike."""
    centres = np.random.default_rng(1234).normal(size=(8, dim)) * 2
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(8, size=count)] + rng.normal(size=(count, dim))).astype(np.float32)


def heldout_floor(train: np.ndarray, heldout: np.ndarray, quantile: float, metric: str,
                  exact_max: int = 50_000) -> DistanceFloor:
    """As `calibrate` sets a floor: each held-out vector's nearest distance in an index of the
    training vectors, then `floor_from_distances`."""
    index = NeighbourIndex(metric, exact_max=exact_max).fit(train)
    return floor_from_distances(index.search(heldout, k=1)[0][:, 0], quantile, metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_floor_is_the_quantile_of_heldout_nearest_distances(metric: str) -> None:
    train, heldout = population(500, seed=0), population(200, seed=1)
    floor = heldout_floor(train, heldout, quantile=0.05, metric=metric)
    if metric == "l2":
        pairwise = np.sqrt(((heldout[:, None].astype(np.float64) - train[None]) ** 2).sum(-1))
    else:
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        pairwise = 1 - unit(heldout.astype(np.float64)) @ unit(train.astype(np.float64)).T
    nearest = pairwise.min(axis=1)
    assert floor.value == pytest.approx(np.quantile(nearest, 0.05), rel=1e-5)
    assert floor.heldout_summary["min"] == pytest.approx(nearest.min(), rel=1e-5)
    assert floor.heldout_summary["median"] == pytest.approx(np.median(nearest), rel=1e-5)
    assert (floor.metric, floor.quantile, floor.n_heldout) == (metric, 0.05, 200)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_planted_copies_fall_under_the_floor_and_new_patients_mostly_do_not(metric: str) -> None:
    train = population(2000, seed=2)
    floor = heldout_floor(train, population(400, seed=3), quantile=0.01, metric=metric)
    rng = np.random.default_rng(4)
    copies = train[rng.choice(len(train), 50, replace=False)]
    near_copies = copies + rng.normal(size=copies.shape).astype(np.float32) * 1e-3
    fresh = population(400, seed=5)  # not the calibration set: new "patients"
    index = NeighbourIndex(metric).fit(train)
    copy_distances = index.search(np.concatenate([copies, near_copies]), k=1)[0][:, 0]
    fresh_distances = index.search(fresh, k=1)[0][:, 0]
    assert floor.flags(copy_distances).all()
    assert floor.flags(fresh_distances).mean() < 0.05


def test_quantile_zero_gives_the_minimum_and_flags_no_heldout_image() -> None:
    train, heldout = population(300, seed=6), population(100, seed=7)
    floor = heldout_floor(train, heldout, quantile=0.0, metric="l2")
    nearest = NeighbourIndex("l2").fit(train).search(heldout, k=1)[0][:, 0]
    assert floor.value == pytest.approx(float(nearest.min()))
    assert not floor.flags(nearest).any()


def test_an_approximate_index_calibrates_close_to_the_exact_floor() -> None:
    train, heldout = population(3000, seed=8), population(300, seed=9)
    exact = heldout_floor(train, heldout, quantile=0.1, metric="cosine")
    approximate = heldout_floor(train, heldout, quantile=0.1, metric="cosine", exact_max=500)
    assert approximate.value == pytest.approx(exact.value, rel=0.05)
    assert approximate.value >= exact.value - 1e-6  # missing a neighbour only lengthens distances


def test_empty_heldout_set_is_a_user_error() -> None:
    with pytest.raises(UserError, match="held-out"):
        floor_from_distances(np.array([]), 0.01, "cosine")
    with pytest.raises(UserError, match="quantile"):
        floor_from_distances(np.array([0.5]), 1.0, "cosine")


def test_floor_round_trips_through_json() -> None:
    floor = floor_from_distances(np.linspace(0.1, 1.0, 50), 0.02, "cosine")
    again = DistanceFloor.from_json(json.loads(json.dumps(floor.to_json())))
    assert again == floor
    below, at = np.nextafter(floor.value, 0), floor.value
    np.testing.assert_array_equal(again.flags(np.array([0.0, below, at, 1.0])),
                                  [True, True, False, False])


def smooth_images(count: int, resolution: int, seed: int) -> np.ndarray:
    """Smooth random images, as radiographs are: on white noise any shift is a large change."""
    from scipy import ndimage

    noise = np.random.default_rng(seed).uniform(0.0, 1.0, (count, resolution, resolution))
    images = np.stack([ndimage.gaussian_filter(n, resolution / 12) for n in noise])
    low, high = images.min(axis=(1, 2), keepdims=True), images.max(axis=(1, 2), keepdims=True)
    return ((images - low) / (high - low) * 0.6 + 0.2).astype(np.float32)


@pytest.mark.parametrize("resolution", [32, 64])
def test_aligned_pixels_find_shifted_and_re_exposed_copies_at_distance_near_zero(
        resolution: int) -> None:
    """A copy moved by up to the shift range (at the working resolution) and re-exposed is
    next to its original; a different image is not, whatever the input size."""
    from scipy import ndimage

    space = AlignedPixels(max_shift=3, smooth=0.7, resolution=32)
    train = smooth_images(40, resolution, seed=0)
    index = space.index(train)
    scale = resolution // 32
    rows = np.arange(0, 40, 4)
    shifts = [(3 * scale, 0), (-2 * scale, 1 * scale), (0, -3 * scale), (1 * scale, 1 * scale)]
    copies = np.stack([ndimage.shift(train[row], shifts[i % len(shifts)], order=0, mode="nearest")
                       for i, row in enumerate(rows)])
    copies = copies * 1.1 - 0.05  # contrast and brightness
    distances, nearest = space.nearest(index, copies)
    np.testing.assert_array_equal(nearest, rows)
    assert (distances < 0.02).all(), distances
    others, _ = space.nearest(index, smooth_images(10, resolution, seed=1))
    assert (others > 5 * distances.max()).all(), (others, distances)
    unshifted, _ = NeighbourIndex("cosine").fit(space.reference(train)).search(
        space.reference(copies), k=1)
    assert unshifted[:, 0].max() > 5 * distances.max()  # without alignment they look far apart


def test_aligned_pixels_find_mirrored_copies_only_when_asked() -> None:
    """A left-right mirrored (and shifted) copy is next to its original with the mirror on, and
    as far as another image with it off."""
    from scipy import ndimage

    train = smooth_images(40, 32, seed=5)
    rows = np.arange(0, 40, 5)
    copies = np.stack([ndimage.shift(train[row][:, ::-1], (1, -2), order=0, mode="nearest")
                       for row in rows])
    mirrored, plain = AlignedPixels(mirror=True), AlignedPixels(mirror=False)
    found, nearest = mirrored.nearest(mirrored.index(train), copies)
    np.testing.assert_array_equal(nearest, rows)
    assert (found < 0.02).all(), found
    missed, _ = plain.nearest(plain.index(train), copies)
    assert missed.min() > 5 * found.max(), (missed, found)


def test_aligned_pixels_take_any_layout_and_survive_flat_images() -> None:
    space = AlignedPixels()
    images = smooth_images(4, 32, seed=2)
    np.testing.assert_array_equal(space.reference(images[:, None]), space.reference(images))
    index = space.index(images)
    distances, _ = space.nearest(index, np.full((2, 32, 32), 0.5, np.float32))
    np.testing.assert_allclose(distances, 1.0, atol=1e-5)  # no structure: uncorrelated
    assert len(list(space.shifted(images))) == 2 * (2 * space.max_shift + 1) ** 2  # and mirrored
    with pytest.raises(ValueError, match="images_float"):
        space.reference((images * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="too small"):
        AlignedPixels(max_shift=3, resolution=32).reference(images[:, :6, :6])



def test_aligned_pixels_search_in_chunks_finds_the_nearest_view_of_each_image(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`nearest` searches many images' views at once, in chunks of whole images: the result is
    each image's smallest distance over its views, searched one view at a time, chunk or not."""
    import unpersonal.privacy.floor as floor

    space = AlignedPixels(max_shift=2, smooth=0.7, resolution=32)
    train, queries = smooth_images(30, 32, seed=0), smooth_images(7, 32, seed=2)
    index = space.index(train)
    per_view = [index.search(view, k=1) for view in space.shifted(queries)]
    distances = np.stack([found[0][:, 0] for found in per_view])
    view = distances.argmin(axis=0)
    expected_rows = np.stack([found[1][:, 0] for found in per_view])[view, np.arange(7)]
    for rows_per_search in (8192, 2 * 25 * 3):  # all at once; chunks of 3 images, then 1
        monkeypatch.setattr(floor, "SEARCH_ROWS", rows_per_search)
        found, rows = space.nearest(index, queries)
        np.testing.assert_allclose(found, np.maximum(distances.min(axis=0), 0), atol=1e-6)
        np.testing.assert_array_equal(rows, expected_rows)
