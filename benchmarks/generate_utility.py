"""Would another setting train a better classifier? The pipeline through `generate` per setting.

    .venv/bin/python benchmarks/generate_utility.py --name "16 steps" --set sampling.steps=16 \
        --real-plus-synthetic                                          # after kermany.py
    .venv/bin/python benchmarks/generate_utility.py --name "seed 1" --set seed=1
    .venv/bin/python benchmarks/generate_utility.py --name "seed-1 generator" \
        --stage-from fit-diffusion=runs/bench-kermany-32-seed-1       # after "seed 1"
    .venv/bin/python benchmarks/generate_utility.py --name "seed 1, 1200 diffusion steps" \
        --base runs/bench-kermany-32-seed-1 --set seed=1 --set diffusion.steps=1200

On the evaluated run of benchmarks/kermany.py (runs/bench-kermany-32), runs the pipeline's
commands from `prepare` through `generate` with the `--set` overrides in a copy of the run
(`<run>-<name>`, resumed when it is there already). Each command skips what the overrides leave
up to date, so a sampling setting reruns `generate` alone and another seed every stage. Then it
scores the released set as `unpersonal evaluate` would (classifiers over `--seeds` seeds,
fidelity in the audit embedder's space) beside the run's own real-trained classifiers: the same
seeds, not trained again. With `--real-plus-synthetic` it also scores the real training images
together with the set.

To take a trained run apart: `--base RUN` copies another trained run instead (another seed's,
so that a diffusion setting with that seed retrains `fit-diffusion` alone), and `--stage-from
STAGE=RUN` puts another run's trained stage in place of the copy's own (another seed's
diffusion model beside this run's filter), to learn which stage's training the utility follows.

Unlike benchmarks/generate_choices.py (300 sources, where utility separates only large
effects), this is the whole training set, as in the headline. The privacy audit is not run
here: a setting worth adopting goes through the headline benchmark, which audits it. Adds the
setting to benchmarks/results/generate_utility.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from kermany import COMMANDS
from runner import (EvaluatedRun, copy_run_without, parser_beside_run, provenance, sets,
                    transplant_stage, unpersonal)
from unpersonal.evaluation.sets import read_synthetic_set
from unpersonal.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "generate_utility.json"


def variant_run(run: Path, name: str, base: Path) -> Path:
    """The copy of `base` (a trained run) this setting generates in, named after `run`; kept,
    so that a rerun resumes it."""
    copy = run.with_name(f"{run.name}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}")
    if not (copy / "manifest.json").is_file():
        copy_run_without(base, copy)
    return copy


def main() -> None:
    parser = parser_beside_run(__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="what the setting is called in the results")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a config override for generate (repeatable)")
    parser.add_argument("--base", type=Path, default=None,
                        help="the trained run to copy (default: --run), for instance another "
                             "seed's, so that a diffusion setting retrains that stage alone")
    parser.add_argument("--stage-from", action="append", default=[], metavar="STAGE=RUN",
                        help="use RUN's trained STAGE in place of the copy's own (repeatable)")
    parser.add_argument("--real-plus-synthetic", action="store_true",
                        help="also score the real training images together with the set")
    options = parser.parse_args()
    base = options.base or options.run
    donors = {}
    for item in options.stage_from:  # checked before anything is copied
        stage, _, donor = item.partition("=")
        if not stage or not donor:
            parser.error(f"--stage-from {item!r}: expected STAGE=RUN")
        donors[stage] = Path(donor)
    evaluated = EvaluatedRun.load(options.run, options.seeds)
    copy = variant_run(options.run, options.name, base)
    for stage, donor in donors.items():
        transplant_stage(copy, stage, donor)
    seconds = {command: unpersonal(command, "--out", str(copy), *sets(*options.overrides))
               for command in ("prepare", *COMMANDS[:COMMANDS.index("generate") + 1])}
    report = json.loads((copy / "generate" / "generate.json").read_text())
    released = read_synthetic_set(copy / "generate" / "synthetic", evaluated.dataset.label_names)
    # Runs by folder name: the results file is committed, and carries no path of this machine.
    result = {"overrides": options.overrides, "base": base.name,
              "stages_from": {stage: donor.name for stage, donor in donors.items()},
              "images": len(released.images),
              "command_s": seconds, "nfe_per_accepted": report.get("nfe_per_accepted"),
              "label_share": released.labels.mean(axis=0).round(4).tolist(),
              "synthetic": evaluated.score(released.images, released.labels)}
    print(json.dumps(result["synthetic"]), flush=True)
    if options.real_plus_synthetic:
        train = evaluated.dataset.subset("train")
        result["real_plus_synthetic"] = evaluated.score(
            np.concatenate([train.images_float(), released.images]),
            np.concatenate([train.labels.astype(released.labels.dtype), released.labels]))
        print(json.dumps(result["real_plus_synthetic"]), flush=True)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"settings": {}}
    saved["settings"][options.name] = {
        **result, "classifier_seeds": options.seeds, **provenance()}
    write_atomic(RESULTS, json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
