"""What to draw, as pure functions of the config: sources, noise seeds, guidance weights.

Nothing here holds state or touches a model. Any process (a resumed run, one shard of many)
recomputes the same source, seed and weight for the same image, which is what makes a sharded
or resumed `generate` equal to one uninterrupted run, and `sample` independent of its batches.
"""

from __future__ import annotations

import numpy as np

from unpersonal.config import GenerateConfig, SamplingConfig


def source_indices(seed: int, count: int, n_train: int) -> np.ndarray:
    """Which training image conditions each output: seeded shuffles, cycled to `count`."""
    rounds = -(-count // n_train)
    order = np.concatenate([np.random.default_rng([seed, 1, r]).permutation(n_train)
                            for r in range(rounds)])
    return order[:count]


def sample_seeds(seed: int, indices: np.ndarray) -> list[int]:
    """One noise seed per `sample` image, a pure function of (run seed, image number)."""
    return [int(np.random.SeedSequence([seed, 2, int(i)]).generate_state(1)[0]) for i in indices]


def candidate_seed(seed: int, position: int, attempt: int, candidate: int) -> int:
    """Noise seed of candidate c of attempt a for the source at `position` of the order."""
    return int(np.random.SeedSequence([seed, 3, position, attempt, candidate]).generate_state(1)[0])


def guidance_at(generate: GenerateConfig, sampling: SamplingConfig, attempt: int,
                conditioning: str) -> float:
    """The guidance weight of a generate attempt (attempt 0: the first weight) for a denoiser
    told `conditioning` (`diffusion.conditioning`).

    The first weight is generate's own, else the sampling section's. Each failed attempt lowers
    it by a step, since a source whose candidates all resemble a patient is better served by a
    weaker pull towards its image; never below the floor, nor raised to a floor above the first.
    Where no weight changes what the denoiser draws (`SamplingConfig.ignores_weight`: told the
    labels alone, guided against them), the weight is 1, which says so and skips the null pass.
    """
    if sampling.ignores_weight(conditioning):
        return 1.0
    first = sampling.guidance if generate.guidance is None else generate.guidance
    floor = min(first, generate.guidance_floor)
    return max(floor, first - attempt * generate.guidance_step)


def drawn_from_source(uses_pseudo: bool, guide: str, weight: float,
                      pseudo_condition: str = "source") -> bool:
    """Whether a candidate drawn at this weight is conditioned on its source's image.

    It is when the model is told the source's own embedding (generate.pseudo_condition
    "source") and guidance keeps it: autoguidance shows both networks the full condition;
    classifier-free guidance at w = 0 keeps only its null (the labels alone, or nothing). The
    privacy filter then holds such a candidate to the pair threshold against that image, the
    one it would most likely copy. A candidate drawn from the mean embedding of the source's
    neighbours of other patients owes the source no more than its mode and labels, and is
    checked against every patient like one drawn from the labels.
    """
    if not uses_pseudo or pseudo_condition != "source":
        return False
    return guide == "autoguidance" or weight != 0
