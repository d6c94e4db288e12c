"""The release summary: each headline figure, its baseline, and a plain verdict.

One function so the HTML report and the datasheet cannot disagree about what passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
    """Utility first (what the data is for), then each privacy test against its baseline.

    A privacy verdict is the audit's one-sided test of that figure (`privacy.json`'s "tests"):
    it fails when the figure exceeds its held-out baseline by more than chance allows, after
    Holm's correction over all the tests, so an honest release fails any of them with
    probability at most alpha.
    """
    classes = metrics["utility"]["classification"]
    real, synthetic = classes["real"], classes["synthetic"]
    low, high = classes["gap_pp_ci95"]
    # Two decimals: at one, a gap of -1.04 would read "-1.0" beside the verdict "not met".
    return [Verdict(
        "classifier trained on synthetic, test ROC-AUC",
        f"{synthetic['mean']:.3f} (gap {classes['gap_pp']:+.2f} pp, "
        f"95% CI {low:+.1f} to {high:+.1f})",
        f"{real['mean']:.3f} trained on real", classes["gap_pp"] >= -1.0,
        "within 1 point of the real-data classifier, tested on the same real test images"),
        *privacy_verdicts(privacy)]


def privacy_verdicts(privacy: dict[str, Any]) -> list[Verdict]:
    """Each privacy test of an audit (`privacy.json`) against its baseline."""
    out: list[Verdict] = []
    tests = privacy["tests"]["by_figure"]

    def p_text(*names: str) -> str:
        worst = min(names, key=lambda name: tests[name]["p_adjusted"])
        return f"p = {_p(tests[worst]['p_value'])}, adjusted {_p(tests[worst]['p_adjusted'])}"

    def passed(*names: str) -> bool:
        return not any(tests[name]["rejected"] for name in names)

    reid = privacy["reid_rate"]
    out.append(Verdict(
        "re-identified: linked to a training patient by the audit's re-ID network",
        f"{reid['synthetic']:.1%} ({p_text('reid_rate')})",
        f"{reid['heldout']:.1%} of new patients' real images", passed("reid_rate"),
        "released images are linked to training patients no more often than real images of "
        "patients the models never saw"))
    for space, dcr in privacy["dcr"].items():
        names = (f"dcr_{space}_q01", f"dcr_{space}_min")
        below_min = tests[names[1]]
        out.append(Verdict(
            f"closer to a training image than 99% of new patients' images ({space} space)",
            f"{dcr['synthetic_share_below']:.1%}, {below_min['count']} closer than any "
            f"({p_text(*names)})",
            f"{dcr['heldout_share_below']:.1%}", passed(*names),
            "no more released images sit unusually close to a training image than new "
            "patients' images do"))
    mia = privacy["membership_inference"]
    attacks = ("distance", "density_ratio")
    out.append(Verdict(
        "membership inference: can the set tell training patients from others?",
        "ROC-AUC " + " / ".join(
            f"{mia[a]['auc']:.3f} ({mia[a]['auc_ci'][0]:.3f} to {mia[a]['auc_ci'][1]:.3f})"
            for a in attacks) + f" ({p_text(*(f'mia_{a}' for a in attacks))})",
        "0.5 = no better than chance", passed(*(f"mia_{a}" for a in attacks)),
        "neither attack (distance / density ratio) tells training patients from new ones "
        "better than chance"))
    pso = privacy["singling_out"]
    ci_low, ci_high = pso["max_ci"]
    out.append(Verdict(
        "singling out: low-weight predicates built from released images isolating one training "
        "patient",
        f"excess {pso['max_excess']:+.3f} (95% CI {ci_low:+.3f} to {ci_high:+.3f}; "
        f"{p_text('singling_out')})",
        "0 = as often as on a held-out population", passed("singling_out"),
        "no more often than on patients the set was not made from"))
    planted = privacy.get("planted_copies")
    if planted:
        out.append(Verdict(
            "planted near-copies of training images caught by the audit",
            f"{planted['caught_all']:.1%}", f"at least {PLANTED_CAUGHT_LIMIT:.0%}",
            planted["caught_all"] >= PLANTED_CAUGHT_LIMIT,
            "the audit is able to see a leak when one is there"))
    probes = privacy.get("identity_probes")
    if probes:
        out.append(Verdict(
            "identity probes (unseen images of training patients) linked by the audit",
            f"{probes['linked']:.1%} ({probes['linked_to_own_patient']:.1%} to their own "
            f"patient; ROC-AUC {probes['auc_vs_heldout']:.3f} against new patients)",
            f"{probes['heldout_linked']:.1%} of new patients' images",
            probes["p_value"] <= privacy["tests"]["alpha"],
            "the audit sees identity on this dataset: it links unseen images of training "
            "patients more often than new patients' images"))
    return out


def leak_sensitivity(privacy: dict[str, Any]) -> str:
    """How large a leak the audit can see, in one sentence (the console table, AUDIT.md and
    the report all say it)."""
    return (f"With {privacy['heldout_images']:,} held-out images the audit is certain to fail "
            f"a release once {privacy['tests']['detectable_copy_share']:.1%} of it or more is "
            "exact copies of training images; a smaller leak may pass.")


def verdict_table(verdicts: list[dict[str, Any]]) -> list[str]:
    """The verdicts as the lines of a Markdown table (the datasheet, an audit's AUDIT.md)."""
    lines = ["| test | released set | baseline | verdict |", "|---|---:|---:|---|"]
    for verdict in verdicts:
        mark = "-" if verdict["passed"] is None else ("pass" if verdict["passed"] else "not met")
        lines.append(f"| {verdict['figure']} | {verdict['value']} | {verdict['baseline']} | "
                     f"{mark} |")
    return lines


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 0.001 else "< 0.001"


def equivalence_verdict(restoration: dict[str, Any]) -> str:
    """One task's restoration equivalence in words: the verdict, then each metric's interval
    against its margin."""
    parts, verdicts = [], []
    for metric, unit, digits in (("psnr", " dB", 2), ("ssim", "", 3)):
        test = restoration["difference"][metric].get("equivalence")
        if test is None:
            return "not tested"
        low, high = test["interval"]
        verdicts.append(test["equivalent"])
        parts.append(f"{metric.upper()} {low:+.{digits}f} to {high:+.{digits}f}{unit} "
                     f"{'within' if test['equivalent'] else 'not within'} "
                     f"±{test['margin']:.{digits}f}{unit}")
    return f"{'yes' if all(verdicts) else 'no'} ({'; '.join(parts)})"
