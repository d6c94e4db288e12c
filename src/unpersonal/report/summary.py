"""The release summary: each headline figure, its baseline, and a plain verdict.

One function so the HTML report and the datasheet cannot disagree about what passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MIA_AUC_LIMIT = 0.55  # membership inference: an attacker barely better than a coin
DCR_SHARE_LIMIT = 0.02  # share closer than held-out's 1st percentile: about 1% expected
# The planted copies test the audit, not the release: one of 1,800 copies under every
# perturbation at once slipping past is still an audit that sees a leak; one in 20 is not.
PLANTED_CAUGHT_LIMIT = 0.99


@dataclass(frozen=True)
class Verdict:
    figure: str
    value: str
    baseline: str
    passed: bool | None  # None: reported, no verdict
    meaning: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def release_verdicts(metrics: dict[str, Any], privacy: dict[str, Any]) -> list[Verdict]:
    """Utility first (what the data is for), then each privacy test against its baseline."""
    classes = metrics["utility"]["classification"]
    real, synthetic = classes["real"], classes["synthetic"]
    low, high = classes["gap_pp_ci95"]
    out = [Verdict(
        "classifier trained on synthetic, test ROC-AUC",
        f"{synthetic['mean']:.3f} (gap {classes['gap_pp']:+.1f} pp, 95% CI {low:+.1f} to {high:+.1f})",
        f"{real['mean']:.3f} trained on real", classes["gap_pp"] >= -1.0,
        "within 1 point of the real-data classifier, tested on the same real test images")]
    reid = privacy["reid_rate"]
    out.append(Verdict(
        "re-identified: linked to a training patient by the audit's re-ID network",
        f"{reid['synthetic']:.1%}", f"{reid['heldout']:.1%} of new patients' real images",
        reid["synthetic"] <= reid["heldout"],
        "released images are linked to training patients no more often than real images of "
        "patients the models never saw"))
    for space, dcr in privacy["dcr"].items():
        out.append(Verdict(
            f"closer to a training image than 99% of new patients' images ({space} space)",
            f"{dcr['synthetic_share_below']:.1%}", f"{dcr['heldout_share_below']:.1%}",
            dcr["synthetic_share_below"] <= DCR_SHARE_LIMIT,
            "no released image sits unusually close to a training image"))
    mia = privacy["membership_inference"]
    worst = max(mia["distance"]["auc"], mia["density_ratio"]["auc"])
    out.append(Verdict(
        "membership inference: can the set tell training patients from others?",
        f"ROC-AUC {worst:.3f}", "0.5 = no better than chance", worst <= MIA_AUC_LIMIT,
        f"the stronger of two attacks stays at or below {MIA_AUC_LIMIT}"))
    pso = privacy["singling_out"]
    ci_low, ci_high = pso["max_ci"]
    out.append(Verdict(
        "singling out: predicates built from released images isolating one training patient",
        f"excess {pso['max_excess']:+.3f} (95% CI {ci_low:+.3f} to {ci_high:+.3f})",
        "0 = as often as on a held-out population", not pso["significant"],
        "no more often than on patients the set was not made from"))
    planted = privacy.get("planted_copies")
    if planted:
        out.append(Verdict(
            "planted near-copies of training images caught by the audit",
            f"{planted['caught_all']:.1%}", f"at least {PLANTED_CAUGHT_LIMIT:.0%}",
            planted["caught_all"] >= PLANTED_CAUGHT_LIMIT,
            "the audit is able to see a leak when one is there"))
    return out
