"""fit-embedder as a user relies on it: features, skipping, resuming, extractors, the probe."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY
from unpersonal.artifacts.embedder import Embedder, load_embedder
from unpersonal.config import ViewAugmentation, load_config
from unpersonal.data.canonical import load_canonical
from unpersonal.errors import Interrupted
from unpersonal.metrics.probe import linear_probe_auc
from unpersonal.models.embedder import FeatureNet
from unpersonal.rundir import RunDir
from unpersonal.stages import execute, stage
from unpersonal.training import embedder
from unpersonal.training.embedder import nt_xent, save_feature_net, vicreg
from unpersonal.training.views import random_views

STAGE = "fit-embedder"
# width 4, 8-d features, 16 px: a dozen steps in well under a second.
SMALL = ("--set", "embedder.width=4", "--set", "embedder.dim=8", "--set", "embedder.batch_size=16",
         "--set", "embedder.checkpoint_every=100")


def _steps(count: int) -> tuple[str, ...]:
    return ("--set", f"embedder.steps={count}")


def _prepared(cli, run: Path, *extra: str) -> Path:
    assert cli("prepare", "--out", run, *TINY, *extra).code == 0
    return run


def _features(run: Path) -> np.ndarray:
    return np.load(run / STAGE / "features.npy")


def test_publishes_unit_norm_features_of_every_image_and_a_probe(cli, tmp_path: Path) -> None:
    run = _prepared(cli, tmp_path / "run", "--set", "phantoms.n_patients=30")
    result = cli("fit-embedder", "--out", run, *SMALL, *_steps(12))
    assert result.code == 0, result.stderr
    folder = run / STAGE
    assert {p.name for p in folder.iterdir()} == {"embedder.safetensors", "embedder.json",
                                                  "features.npy", "training_log.csv"}
    dataset = load_canonical(run / "prepare")
    features = _features(run)
    assert features.shape == (len(dataset), 8) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    meta = json.loads((folder / "embedder.json").read_text())
    assert meta["source"] == "trained" and meta["steps_done"] == 12 and meta["dim"] == 8
    probe = meta["linear_probe"]
    assert 0.0 <= probe["mean_auc"] <= 1.0 and probe["n_test"] == (dataset.split == "test").sum()
    assert "12 steps" in result.stderr and f"AUC {probe['mean_auc']:.3f}" in result.stderr
    log = (folder / "training_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,images_per_s,elapsed_s" and len(log) == 1 + 2
    # The reloaded embedder gives the published features of the same images.
    np.testing.assert_allclose(load_embedder(folder).embed(dataset.images_float()), features,
                               atol=1e-5)
    assert "up to date" in cli("fit-embedder", "--out", run, *SMALL, *_steps(12)).stderr


def test_same_seed_same_features_another_seed_others(cli, tmp_path: Path) -> None:
    runs = [_prepared(cli, tmp_path / name) for name in ("a", "b", "c")]
    for run, seed in zip(runs, (0, 0, 1)):
        assert cli("fit-embedder", "--out", run, *SMALL, *_steps(8), "--set",
                   "embedder.method=vicreg", "--set", f"seed={seed}").code == 0
    assert _features(runs[0]).tobytes() == _features(runs[1]).tobytes()
    assert not np.allclose(_features(runs[0]), _features(runs[2]))


def test_ctrl_c_saves_and_rerun_resumes_to_the_same_weights(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, resumed = _prepared(cli, tmp_path / "straight"), _prepared(cli, tmp_path / "resumed")
    assert cli("fit-embedder", "--out", straight, *SMALL, *_steps(8)).code == 0
    calls, original = {"n": 0}, embedder.random_views

    def interrupt_in_step_3(*args, **kwargs):  # two views per step: call 7 is step 3's first
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(embedder, "random_views", interrupt_in_step_3)
    stopped = cli("fit-embedder", "--out", resumed, *SMALL, *_steps(8))
    assert stopped.code == 130 and "interrupted at step 3 of 8" in stopped.stderr
    assert (resumed / ".work" / STAGE / "checkpoint.pt").is_file()
    assert not (resumed / STAGE).exists()
    monkeypatch.setattr(embedder, "random_views", original)
    again = cli("fit-embedder", "--out", resumed, *SMALL, *_steps(8))
    assert again.code == 0 and "resuming at step 3" in again.stderr
    weights = "embedder.safetensors"
    assert (resumed / STAGE / weights).read_bytes() == (straight / STAGE / weights).read_bytes()
    assert not (resumed / ".work" / STAGE).exists()
    # The losses of the steps before the interruption count in the first row after it.
    assert _losses(resumed) == _losses(straight)


def _losses(run: Path) -> list[tuple[str, str, str]]:
    with open(run / STAGE / "training_log.csv") as handle:
        return [(row["step"], row["loss"], row["lr"]) for row in csv.DictReader(handle)]


def test_the_audits_embedder_names_its_own_stage_when_interrupted(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit trains its embedder through fit-embedder's build function, as audit-embedder."""
    run = _prepared(cli, tmp_path / "run")
    config = load_config(None, run / "config.yaml",
                         ["embedder.steps=8", "embedder.batch_size=16", "audit.embedder_width=4"])
    calls = {"n": 0}

    def interrupt_in_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return random_views(*args, **kwargs)

    monkeypatch.setattr(embedder, "random_views", interrupt_in_step_2)
    with pytest.raises(Interrupted, match="^audit-embedder interrupted at step 1 of 8"):
        execute(stage("audit-embedder"), config, RunDir(run))
    assert (run / ".work" / "audit-embedder" / "checkpoint.pt").is_file()


def test_max_minutes_stops_early_and_still_publishes(cli, tmp_path: Path) -> None:
    run = _prepared(cli, tmp_path / "run")
    result = cli("fit-embedder", "--out", run, *SMALL, *_steps(10_000), "--set",
                 "embedder.max_minutes=0.001")
    assert result.code == 0, result.stderr
    meta = json.loads((run / STAGE / "embedder.json").read_text())
    assert 1 <= meta["steps_done"] < 10_000 and meta["steps_planned"] == 10_000
    assert _features(run).shape[0] == len(load_canonical(run / "prepare"))


def _view_separation(model: Embedder, run: Path, spec: ViewAugmentation) -> float:
    """How often two views of one image are closer than views of another patient's images.

    0.5 = views carry nothing of their image; 1 = a view always finds its partner first.
    """
    dataset = load_canonical(run / "prepare")
    images = torch.from_numpy(dataset.images_float()).unsqueeze(1)
    generator = torch.Generator().manual_seed(1234)
    views = [random_views(images, spec, generator)[:, 0].numpy() for _ in range(2)]
    similarity = model.embed(views[0]) @ model.embed(views[1]).T
    other_patient = dataset.patient_id[:, None] != dataset.patient_id[None, :]
    closer = (np.diag(similarity)[:, None] > similarity) & other_patient
    return float((closer.sum(1) / other_patient.sum(1)).mean())


# Crops, rotations, shifts, blur and noise, without the exposure changes: at 16 px a network
# needs hundreds of steps to see through those, and this test should take two seconds.
GEOMETRIC_VIEWS = {"brightness": 0.0, "contrast": 0.0, "gamma": 0.0}


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_training_makes_the_embedding_augmentation_invariant(cli, tmp_path: Path,
                                                             method: str) -> None:
    run = _prepared(cli, tmp_path / "run")
    views = [item for key, value in GEOMETRIC_VIEWS.items()
             for item in ("--set", f"embedder.augment.{key}={value}")]
    assert cli("fit-embedder", "--out", run, *SMALL, *_steps(30), *views, "--set",
               "embedder.batch_size=32", "--set", "embedder.lr=0.01", "--set",
               f"embedder.method={method}").code == 0
    torch.manual_seed(0)  # the initial weights the run started from (seed 0)
    at_init = Embedder(FeatureNet(width=4, dim=8).eval(), 16, 8, torch.device("cpu"))
    spec = ViewAugmentation(**GEOMETRIC_VIEWS)
    before = _view_separation(at_init, run, spec)
    after = _view_separation(load_embedder(run / STAGE), run, spec)
    assert after > 0.75 and after > before + 0.1, (before, after)


class _TinyExtractor(torch.nn.Module):
    def __init__(self, out_shape: str = "ok") -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 5, 3, padding=1)
        self.wrong = out_shape == "wrong"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.conv(x))
        return y if self.wrong else y.mean(dim=(2, 3)) + x.flatten(1)[:, :5]


def _scripted(path: Path, out_shape: str = "ok") -> Path:
    torch.manual_seed(0)
    torch.jit.script(_TinyExtractor(out_shape)).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_extractor_replaces_training(cli, tmp_path: Path) -> None:
    run = _prepared(cli, tmp_path / "run")
    extractor = _scripted(tmp_path / "mine.pt")
    uses = ("--set", f"embedder.extractor={extractor}")
    result = cli("fit-embedder", "--out", run, *uses)
    assert result.code == 0, result.stderr
    assert "extractor mine.pt: 0 steps" in result.stderr
    meta = json.loads((run / STAGE / "embedder.json").read_text())
    assert meta["source"] == "extractor" and meta["dim"] == 5
    assert meta["weights_format"] == "torchscript"
    images = load_canonical(run / "prepare").images_float()
    with torch.no_grad():
        expected = torch.jit.load(str(extractor))(torch.from_numpy(images).unsqueeze(1)).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(_features(run), expected, atol=1e-5)
    extractor.unlink()  # the stage keeps its own copy
    np.testing.assert_allclose(load_embedder(run / STAGE).embed(images), expected, atol=1e-5)
    _scripted(extractor)
    assert "up to date" in cli("fit-embedder", "--out", run, *uses).stderr
    torch.manual_seed(1)
    torch.jit.script(_TinyExtractor()).save(str(extractor))  # other weights: not up to date
    assert "up to date" not in cli("fit-embedder", "--out", run, *uses).stderr


def test_safetensors_extractor_reproduces_the_embedder_it_came_from(cli, tmp_path: Path) -> None:
    trained = _prepared(cli, tmp_path / "trained")
    assert cli("fit-embedder", "--out", trained, *SMALL, *_steps(6)).code == 0
    other = _prepared(cli, tmp_path / "other")
    weights = trained / STAGE / "embedder.safetensors"
    result = cli("fit-embedder", "--out", other, "--set", f"embedder.extractor={weights}")
    assert result.code == 0, result.stderr
    np.testing.assert_allclose(_features(other), _features(trained), atol=1e-6)


def _unlabelled_safetensors(path: Path) -> Path:
    network = FeatureNet(4, 8)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


def _mismatched_safetensors(path: Path) -> Path:
    network = FeatureNet(4, 8)
    network.architecture = {**network.architecture, "width": 8}
    save_feature_net(path, network)
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("make, problem", [
    (lambda p: _scripted(p / "bad.pt", "wrong"), "to [2, 5, 16, 16], expected [2, D]"),
    (lambda p: (p / "bad.pt").write_bytes(b"not a model") and p / "bad.pt", "not a TorchScript"),
    (lambda p: _unlabelled_safetensors(p / "bad.safetensors"), "metadata"),
    (lambda p: _mismatched_safetensors(p / "bad.safetensors"), "do not match"),
    (lambda p: p / "missing.pt", "no such file"),
])
def test_broken_extractor_exits_2_naming_the_file(cli, tmp_path: Path, make, problem: str) -> None:
    run = _prepared(cli, tmp_path / "run")
    extractor = make(tmp_path)
    result = cli("fit-embedder", "--out", run, "--set", f"embedder.extractor={extractor}")
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(extractor) in lines[0] and problem in lines[0], lines
    assert not (run / STAGE).exists()


def test_losses_prefer_matched_views() -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(32, 16, generator=generator)
    noisy = z + 0.1 * torch.randn(32, 16, generator=generator)
    shuffled = noisy[torch.randperm(32, generator=generator)]
    assert nt_xent(z, noisy, 0.2) < nt_xent(z, shuffled, 0.2) - 1.0
    assert vicreg(z, noisy) < vicreg(z, shuffled) - 10.0
    collapsed = torch.zeros(32, 16)
    assert vicreg(collapsed, collapsed) > 25.0 * 2 * 0.9  # the variance hinge stops collapse


def _labels(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "multiclass":
        return np.eye(3, dtype=np.uint8)[rng.integers(0, 3, n)]
    return rng.integers(0, 2, (n, 1 if kind == "binary" else 3)).astype(np.uint8)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_linear_probe_reads_separable_labels_and_not_random_ones(kind: str) -> None:
    rng = np.random.default_rng(0)
    names = ["finding"] if kind == "binary" else ["a", "b", "c"]
    y_train, y_test = _labels(rng, 600, kind), _labels(rng, 600, kind)

    def separable(y: np.ndarray) -> np.ndarray:
        return np.hstack([3.0 * y, rng.normal(size=(len(y), 12))])

    clear = linear_probe_auc(separable(y_train), y_train, separable(y_test), y_test, kind, names)
    assert set(clear["per_label"]) == set(names) and clear["mean_auc"] > 0.97
    noise = linear_probe_auc(rng.normal(size=(600, 15)), y_train, rng.normal(size=(600, 15)),
                             y_test, kind, names)
    assert abs(noise["mean_auc"] - 0.5) < 0.06


def test_linear_probe_skips_columns_without_two_classes_and_says_why() -> None:
    rng = np.random.default_rng(1)
    y_train = rng.integers(0, 2, (100, 3)).astype(np.uint8)
    y_train[:, 2] = 0
    y_test = rng.integers(0, 2, (50, 3)).astype(np.uint8)
    y_test[:, 1] = 1
    x = rng.normal(size=(150, 4))
    result = linear_probe_auc(x[:100], y_train, x[100:], y_test, "multilabel", ["a", "b", "c"])
    assert list(result["per_label"]) == ["a"] and result["mean_auc"] == result["per_label"]["a"]
    assert result["skipped"] == {"b": "one class in the test split",
                                 "c": "one class in the training split"}
    empty = linear_probe_auc(x[:100], y_train, x[:0], y_test[:0], "multilabel", ["a", "b", "c"])
    assert empty["mean_auc"] is None and set(empty["skipped"]) == {"a", "b", "c"}


def test_input_size_makes_the_networks_see_any_resolution_at_one_cost(tmp_path: Path) -> None:
    """An image twice the input size (each pixel repeated 2x2) area-averages back to the small
    image exactly, so the embedder and the classifier give what they give on the small one; the
    size survives the embedder's weights file."""
    from unpersonal.artifacts.embedder import load_feature_net
    from unpersonal.models.classifier import ClassifierNet
    from unpersonal.models.encoder import downsampled

    small = torch.rand(3, 1, 8, 8)
    large = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(downsampled(large, 8), small) and downsampled(small, 16) is small
    for net in (FeatureNet(4, 6, input_size=8), ClassifierNet(4, 2, input_size=8)):
        net.eval()
        assert torch.allclose(net(large), net(small), atol=1e-6)
    path = tmp_path / "embedder.safetensors"
    save_feature_net(path, FeatureNet(4, 6, input_size=8).eval())
    assert load_feature_net(path).input_size == 8
