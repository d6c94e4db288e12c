"""Each verdict of the report and the datasheet, on a release that must pass it and on one that
must fail it: a flipped comparison or a verdict read from the wrong test fails here."""

from __future__ import annotations

from typing import Any

import pytest

from unpersonal.privacy.significance import holm
from unpersonal.report.summary import release_verdicts

TESTS = ("reid_rate", "dcr_embedding_q01", "dcr_embedding_min", "dcr_pixel_q01",
         "dcr_pixel_min", "mia_distance", "mia_density_ratio", "singling_out")
REID = "re-identified: linked to a training patient by the audit's re-ID network"
MIA = "membership inference: can the set tell training patients from others?"
PSO = ("singling out: low-weight predicates built from released images isolating one training "
       "patient")
PLANTED = "planted near-copies of training images caught by the audit"
UTILITY = "classifier trained on synthetic, test ROC-AUC"
VERDICT_OF = {
    "reid_rate": REID, "mia_distance": MIA, "mia_density_ratio": MIA, "singling_out": PSO,
    **{f"dcr_{space}_{cut}": f"closer to a training image than 99% of new patients' images "
                             f"({space} space)"
       for space in ("embedding", "pixel") for cut in ("q01", "min")}}


def metrics(gap_pp: float = 0.0) -> dict[str, Any]:
    interval = {"mean": 0.9, "ci95": [0.88, 0.92]}
    return {"utility": {"classification": {"real": interval, "synthetic": interval,
                                           "gap_pp": gap_pp, "gap_pp_ci95": [gap_pp - 1,
                                                                             gap_pp + 1]}}}


def privacy(p_values: dict[str, float], caught_all: float = 1.0) -> dict[str, Any]:
    """An audit's privacy.json with these p-values (the figures themselves do not decide)."""
    verdicts = holm(p_values)
    dcr = {"synthetic_share_below": 0.01, "heldout_share_below": 0.01, "heldout_q01": 0.1}
    return {
        "reid_rate": {"synthetic": 0.02, "heldout": 0.02},
        "dcr": {"embedding": dcr, "pixel": dcr},
        "membership_inference": {attack: {"auc": 0.5, "auc_ci": [0.45, 0.55]}
                                 for attack in ("distance", "density_ratio")},
        "singling_out": {"max_excess": 0.0, "max_ci": [-0.01, 0.01]},
        "planted_copies": {"caught_all": caught_all},
        "tests": {"alpha": 0.05, "by_figure": {name: {**verdicts[name], "count": 0}
                                               for name in TESTS},
                  "passed": not any(v["rejected"] for v in verdicts.values())}}


def failed(metrics_: dict[str, Any], privacy_: dict[str, Any]) -> set[str]:
    return {v.figure for v in release_verdicts(metrics_, privacy_) if v.passed is False}


def test_an_honest_release_passes_every_verdict() -> None:
    assert failed(metrics(), privacy({name: 0.5 for name in TESTS})) == set()


@pytest.mark.parametrize("name", TESTS)
def test_each_verdict_fails_when_its_test_does_and_no_other(name: str) -> None:
    p_values = {other: 0.5 for other in TESTS}
    p_values[name] = 1e-4
    assert failed(metrics(), privacy(p_values)) == {VERDICT_OF[name]}


def test_a_p_value_that_fails_alone_passes_after_the_correction() -> None:
    """p = 0.03 is below 0.05 but, one test among eight, not below 0.05 / 8."""
    p_values = {other: 0.5 for other in TESTS}
    p_values["reid_rate"] = 0.03
    assert failed(metrics(), privacy(p_values)) == set()


def test_the_utility_verdict_asks_for_one_point() -> None:
    honest = privacy({name: 0.5 for name in TESTS})
    assert UTILITY not in failed(metrics(-0.9), honest)
    assert UTILITY in failed(metrics(-1.1), honest)


def test_the_planted_copy_verdict_asks_the_audit_to_catch_99_in_100() -> None:
    """One copy of 1,800 slipping past every perturbation at once is an audit that still sees
    leaks (Kermany's: 99.9%); one in 20 is not."""
    p_values = {name: 0.5 for name in TESTS}
    assert PLANTED not in failed(metrics(), privacy(p_values, 1.0))
    assert PLANTED not in failed(metrics(), privacy(p_values, 0.9994))
    assert PLANTED in failed(metrics(), privacy(p_values, 0.95))
