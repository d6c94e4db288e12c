"""`unpersonal fit-embedder` (and the audit's own embedder): the self-supervised image encoder."""

from __future__ import annotations

from typing import Any

from unpersonal.artifacts.embedder import Embedder
from unpersonal.data.canonical import load_canonical
from unpersonal.stages import StageTask
from unpersonal.torch_utils import pick_device
from unpersonal.training.embedder import (embed_dataset, extractor_embedder, probe_features,
                                          publish, train, trained_meta)


def build_fit_embedder(task: StageTask) -> dict[str, Any]:
    """Train (or resume, or load the extractor) and publish; returns embedder.json's content.

    The audit's own embedder (stage audit-embedder) is built here too, from its derived config."""
    config, run = task.config, task.run
    dataset = load_canonical(task.input("prepare"))
    device = pick_device()
    if config.embedder.extractor is not None:
        embedder, meta = extractor_embedder(config.embedder.extractor, dataset, device)
        log: list[dict[str, float]] = []
    else:
        work = task.work_dir()
        result = train(config.embedder, config.seed, dataset.subset("train"),
                       work / "checkpoint.pt", device, task.name)
        embedder = Embedder(result.network, dataset.resolution, config.embedder.dim, device)
        meta, log = trained_meta(config.embedder, result), result.log
    features = embed_dataset(embedder, dataset)
    meta["linear_probe"] = probe_features(features, dataset)
    meta.update({"dim": int(features.shape[1]), "resolution": dataset.resolution,
                 "n_images": len(dataset)})
    with task.output() as folder:
        publish(folder, embedder, meta, features, log, config.embedder)
    run.clear_work(task.name)
    return meta
