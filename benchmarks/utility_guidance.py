"""What classifier-free guidance on the labels does to a synthetic set's utility.

    .venv/bin/python benchmarks/utility_guidance.py --weights 1 2     # after benchmarks/kermany.py

The class-conditional model of benchmarks/diffusion_quality.py (runs/bench-diffusion-k32)
draws one image per training image at each guidance weight w (DPM-Solver++ 16 steps; w = 1 is
no guidance, w > 1 pushes each image towards its label and away from the unconditional model,
at twice the network evaluations). Each set is evaluated as `unpersonal evaluate` would: fidelity in
the audit embedder's space and classifiers over `--seeds` seeds tested on the real test split,
beside the real-trained classifiers of runs/bench-kermany-32/eval (same seeds and settings).
Writes benchmarks/results/utility_guidance.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from runner import EvaluatedRun, parser_beside_run, provenance, sets, unpersonal
from unpersonal.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL_RUN = ROOT / "runs" / "bench-diffusion-k32"


def main() -> None:
    parser = parser_beside_run(__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0])
    options = parser.parse_args()
    if not (MODEL_RUN / "fit-diffusion" / "model.json").is_file():
        sys.exit("run benchmarks/diffusion_quality.py first")
    evaluated = EvaluatedRun.load(options.run, options.seeds)
    dataset = evaluated.dataset
    results = {}
    for weight in options.weights:
        wall = unpersonal("sample", "--out", str(MODEL_RUN), *sets(
            "diffusion.conditioning=class", "sampling.guidance_against=empty",
            f"sampling.count={len(dataset.subset('train'))}",
            "sampling.solver=dpmpp2m", "sampling.steps=16", f"sampling.guidance={weight}",
            "sampling.batch_size=250"))
        with np.load(MODEL_RUN / "sample" / "images.npz") as arrays:
            images, labels = arrays["images"].astype(np.float32) / 255.0, arrays["labels"]
        results[f"w={weight:g}"] = {"guidance": weight, "sample_wall_s": wall,
                                    **evaluated.score(images, labels)}
        print(json.dumps(results[f"w={weight:g}"]), flush=True)
    out = {"weights": results, "classifier_seeds": options.seeds,
           **provenance()}
    write_atomic(RESULTS / "utility_guidance.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
