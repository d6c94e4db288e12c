"""Sample quality against cost: EDM Heun (63 NFE) vs our DPM-Solver++(2M) at 10/16/24 NFE.

    .venv/bin/python benchmarks/diffusion_quality.py        # about 35 min on 2 cores

On the Kermany chest X-rays (../shared/data/kermany_cxr_64.npz, prepared at the cpu preset's
32 px), trains a class-conditional model with the cpu preset's budget through the CLI, as a
user would, then draws the same number of images with each solver and measures the Fréchet
distance to the real test images. Until the embedder exists the feature space is a fixed one:
PCA of the training pixels (`PixelPCA`, 64 dims). The FD between a same-size sample of real
training images and the test images is reported as the floor a perfect generator would reach.

Writes benchmarks/results/diffusion.json, merging in the throughput figures of
benchmarks/diffusion_throughput.py when its results file exists. Images drawn from the real
data stay in the run directory (runs/, not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from runner import unpersonal
from unpersonal.data.canonical import load_canonical
from unpersonal.evaluation.fidelity import frechet_distance
from unpersonal.models.pixel_pca import PixelPCA

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
RESULTS = ROOT / "benchmarks" / "results"
SOLVERS = [("heun", 32), ("dpmpp2m", 10), ("dpmpp2m", 16), ("dpmpp2m", 24)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-diffusion-k32")
    parser.add_argument("--count", type=int, default=1000, help="images drawn per solver")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for training, e.g. diffusion.steps=100")
    options = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    training = ["--set", "diffusion.conditioning=class", *sum((["--set", o] for o in options.overrides), [])]
    started = time.perf_counter()
    unpersonal("prepare", "--data", str(DATA), "--out", str(options.run), "--preset", "cpu")
    unpersonal("fit-diffusion", "--out", str(options.run), *training)
    model = json.loads((options.run / "fit-diffusion" / "model.json").read_text())

    dataset = load_canonical(options.run / "prepare")
    train, test = dataset.subset("train"), dataset.subset("test")
    features = PixelPCA(dim=64).fit(train.images_float())
    test_features = features.transform(test.images_float())
    rng = np.random.default_rng(0)
    real_sample = train.images_float()[rng.choice(len(train), options.count, replace=False)]
    result = {"fd_real_train_vs_test": round(frechet_distance(test_features,
                                                              features.transform(real_sample)), 5)}
    fd_fast, runs = {}, []
    for solver, steps in SOLVERS:
        unpersonal("sample", "--out", str(options.run), "--force", *training,
                   "--set", f"sampling.solver={solver}", "--set", f"sampling.steps={steps}",
                   "--set", f"sampling.count={options.count}", "--set", "sampling.batch_size=250")
        report = json.loads((options.run / "sample" / "sampling.json").read_text())
        with np.load(options.run / "sample" / "images.npz") as arrays:
            synthetic = arrays["images"].astype(np.float32) / 255.0
        fd = round(frechet_distance(test_features, features.transform(synthetic)), 5)
        runs.append({"solver": solver, "steps": steps, "nfe": report["nfe_per_image"], "fd": fd,
                     "images_per_s": report["images_per_s"]})
        print(json.dumps(runs[-1]), flush=True)
        if solver == "heun":
            result["fd_heun_63nfe"] = fd
        else:
            fd_fast[str(report["nfe_per_image"])] = fd
    result.update({
        "fd_fast": fd_fast, "solver_runs": runs, "resolution": model["resolution"],
        "feature_space": "PixelPCA(64) of the training pixels",
        "fd_against": f"{len(test)} real test images", "images_per_solver": options.count,
        "training": {"steps": model["steps_done"], "seconds": model["seconds"],
                     "parameters": model["parameters"], "conditioning": "class"},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, 2-core CPU, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/diffusion_quality.py" + "".join(
            f" --set {o}" for o in options.overrides),
    })
    throughput = RESULTS / "diffusion_throughput.json"
    if throughput.is_file():
        first = json.loads(throughput.read_text())["cases"][0]
        result.update({"train_img_per_s_ours": first["ours"]["img_per_s"],
                       "train_img_per_s_diffusers": first["diffusers"]["img_per_s"],
                       "params_ours": first["ours"]["params"],
                       "params_diffusers": first["diffusers"]["params"]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "diffusion.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
