"""What patient-level differential privacy costs on Kermany at the cpu preset: the release
trained without it and at epsilon 10, 4 and 1, the same steps and the same privacy models.

    .venv/bin/python benchmarks/dp.py [--epsilons 10 4 1] [--seeds 3] [--only none 10 ...]

1. `runs/dp-none`: `unpersonal run` on kermany_cxr_64.npz at the cpu preset, restoration off,
   `--seeds` classifier seeds, the denoiser told the labels alone (`diffusion.conditioning=class`,
   as differential privacy needs; the cpu preset draws from the labels anyway): the row
   without differential privacy.
2. For each epsilon E, `runs/dp-E`: a copy of dp-none's prepare and privacy models (every stage
   before fit-diffusion), then `unpersonal run --set diffusion.privacy.epsilon=E`: the denoiser
   trains again with DP-SGD at the level of patients (same steps, `diffusion.batch_size`
   expected patients per step), and generate, the audit and evaluate follow as usual.
3. Every run's model.json, generate.json, metrics.json and privacy.json into
   `benchmarks/results/dp.json`, and the table into BENCHMARKS.md (`<!-- dp.py -->`).

    .venv/bin/python benchmarks/dp.py --step-cost [--rounds 5 --steps 3]

times the cpu preset's training step at 32 px without privacy (64 images) and with it (64
patients, one image each at 1 and at 2 noise levels), in alternating rounds, medians, into
dp.json's "step_cost".

Each run resumes where it stopped (`--only` runs chosen rows, one per core for example); rows
whose run has not finished are left out of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kermany import fidelity_row, privacy_row, stage_seconds, utility_row
from runner import copy_run_without, provenance, sets, side_by_side, unpersonal, write_table
from unpersonal.report.summary import release_verdicts
from unpersonal.rundir import RunDir, write_atomic
from unpersonal.stages import downstream_of

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kermany_cxr_64.npz"
RESULTS = ROOT / "benchmarks" / "results" / "dp.json"


def run_folder(row: str) -> Path:
    return ROOT / "runs" / f"dp-{row}"


def train(row: str, seeds: int) -> None:
    """The row's run through the CLI, resuming what is done."""
    run = run_folder(row)
    common = sets("evaluate.restoration=false", f"evaluate.classifier_seeds={seeds}",
                  "diffusion.conditioning=class")
    if row == "none":
        unpersonal("run", "--out", str(run), "--data", str(DATA), "--preset", "cpu", *common)
        return
    base = run_folder("none")
    if not RunDir(base).stage_record("fit-classifier"):
        sys.exit(f"{base} has no privacy models yet: run the row 'none' first")
    if not run.exists():
        copy_run_without(base, run, ("fit-diffusion", *downstream_of("fit-diffusion")))
    unpersonal("run", "--out", str(run), *common, *sets(f"diffusion.privacy.epsilon={row}"))


def row_figures(row: str) -> dict[str, Any] | None:
    """The row's figures, or None while its run is unfinished."""
    run = run_folder(row)
    if not RunDir(run).stage_record("eval") or not RunDir(run).stage_record("audit"):
        return None
    model = json.loads((run / "fit-diffusion" / "model.json").read_text())
    generation = json.loads((run / "generate" / "generate.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    privacy = json.loads((run / "audit" / "privacy.json").read_text())
    classification = metrics["utility"]["classification"]
    return {"row": row, "differential_privacy": model.get("privacy"),
            "fit_diffusion_s": stage_seconds(run).get("fit-diffusion"),
            "acceptance_rate": generation["acceptance_rate"],
            "released": generation["accepted_sources"],
            "real": utility_row(classification, "real"),
            "synthetic": utility_row(classification, "synthetic"),
            **privacy_row(privacy), **fidelity_row(metrics["fidelity"]),
            "verdicts": {v.figure: v.passed for v in release_verdicts(metrics, privacy)}}


def step_cost(rounds: int, steps: int) -> dict[str, Any]:
    """Seconds per training step of the cpu preset's denoiser, plain against private."""
    import torch

    from unpersonal.artifacts.denoiser import build_denoiser
    from unpersonal.config import DiffusionPrivacy, load_config
    from unpersonal.models.conditioning import Conditioner
    from unpersonal.models.edm import EDM2Loss
    from unpersonal.models.unet import renormalize_weights
    from unpersonal.training import private

    settings = load_config("cpu").diffusion
    batch, conditioner = settings.batch_size, Conditioner("class", 2, 0)
    torch.manual_seed(0)
    nets = {name: build_denoiser(settings, 32, conditioner)
            for name in ("without DP", "DP, 1 noise level", "DP, 2 noise levels")}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-3) for name, net in nets.items()}
    loss_fn, generator = EDM2Loss(), torch.Generator().manual_seed(0)
    plan = private.plan(DiffusionPrivacy(epsilon=4.0), 3308, batch, settings.steps)

    def rows(count: int) -> list[torch.Tensor]:
        images = torch.randn(count, 1, 32, 32, generator=generator) * 0.5
        sigma = loss_fn.sample_sigma(count, torch.device("cpu"), generator)
        noise = torch.randn(images.shape, generator=generator)
        labels = torch.randint(0, 2, (count,), generator=generator)
        cond = conditioner.build(torch.nn.functional.one_hot(labels, 2).float(), None)
        return [images, sigma, noise, cond]

    def step(name: str) -> None:
        net, optimizer = nets[name], optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        if name == "without DP":
            images, _, _, cond = rows(batch)
            loss_fn(net.train(), images, cond, generator=generator).mean().backward()
        else:
            levels = 1 if name.startswith("DP, 1") else 2
            inputs = [t.reshape(batch, levels, *t.shape[1:]) for t in rows(batch * levels)]
            net.eval()
            renormalize_weights(net)
            summed, _ = private.clipped_sum(net, loss_fn.given, inputs, 1.0)
            for k, v in private.add_noise(summed, plan, 0, 0).items():
                dict(net.named_parameters())[k].grad = v
        optimizer.step()

    medians, every = side_by_side(list(nets), step, rounds, steps, batch)
    seconds = {name: round(batch / rate, 3) for name, rate in medians.items()}
    plain = seconds["without DP"]
    return {"threads": torch.get_num_threads(), "batch": batch, "rounds": rounds,
            "steps_per_round": steps, "seconds_per_step": seconds,
            "times_without_dp": {name: round(value / plain, 2) for name, value in seconds.items()},
            "images_or_patients_per_s_all_rounds": every}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| training | epsilon (delta) | noise multiplier | fit-diffusion (min) | "
             "synthetic-only ROC-AUC | gap to real (pp, 95% CI) | MIA AUC | singling-out "
             "excess (95% CI) | re-ID rate | FD | coverage | privacy verdicts passed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dp = r["differential_privacy"]
        budget = "none" if dp is None else f"{dp['epsilon']:.2f} ({dp['delta']:g})"
        sigma = "" if dp is None else f"{dp['noise_multiplier']:.2f}"
        low, high = r["synthetic"]["gap_pp_ci"]
        pso_low, pso_high = r["pso_excess_ci"]
        privacy = [passed for figure, passed in list(r["verdicts"].items())[1:]
                   if passed is not None]  # the first verdict is utility's
        lines.append(
            f"| {'without DP' if dp is None else 'DP-SGD, patients'} | {budget} | {sigma} | "
            f"{r['fit_diffusion_s'] / 60:.0f} | {r['synthetic']['auc']:.3f} | "
            f"{r['synthetic']['gap_pp']:+.1f} ({low:+.1f} to {high:+.1f}) | {r['mia_auc']:.3f} | "
            f"{r['pso_excess']:+.3f} ({pso_low:+.3f} to {pso_high:+.3f}) | "
            f"{r['reid_rate']:.4f} | {r['fd']:.4f} | {r['coverage']:.3f} | "
            f"{sum(privacy)} of {len(privacy)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", default=["10", "4", "1"])
    parser.add_argument("--seeds", type=int, default=3, help="classifier training seeds")
    parser.add_argument("--only", nargs="+", metavar="ROW",
                        help="train only these rows ('none' or an epsilon), then report")
    parser.add_argument("--report", action="store_true", help="train nothing, report what is done")
    parser.add_argument("--step-cost", action="store_true",
                        help="time the training step with and without privacy, nothing else")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if options.step_cost:
        results["step_cost"] = {**provenance(), **step_cost(options.rounds, options.steps)}
        write_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["step_cost"], indent=2))
        return
    if not DATA.is_file():
        sys.exit(f"needs {DATA}")
    rows = ["none", *options.epsilons]
    if not options.report:
        for row in options.only or rows:
            train(row, options.seeds)
    done = [figures for row in rows if (figures := row_figures(row)) is not None]
    results["releases"] = {**provenance(), "rows": done}
    write_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
    write_table(ROOT / "BENCHMARKS.md", "dp.py", markdown(done))
    print(markdown(done))


if __name__ == "__main__":
    main()
