"""The device, and randomness that is a pure function of (seed, step, rank).

Trainers, the restoration benchmark of `evaluate` and the published models' loaders share these:
everything random of step t comes from a generator seeded by (seed, t, rank), so a resumed run
repeats exactly what an uninterrupted one would have done without saving any RNG state.
"""

from __future__ import annotations

import numpy as np
import torch


def pick_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 32-bit seed for step `step` of process `rank`: a pure function, so resumes repeat it."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, device: torch.device | str = "cpu",
                   rank: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(step_seed(seed, step, rank))


def batch_indices(seed: int, step: int, rank: int, local_batch: int, world: int, n: int
                  ) -> torch.Tensor:
    """This process's images for `step`: epochs of seeded permutations, split across processes.

    Every image is seen once per epoch, and the indices are a pure function of the arguments.
    """
    first = step * local_batch * world + rank * local_batch
    positions = np.arange(first, first + local_batch)
    out = np.empty(local_batch, dtype=np.int64)
    for epoch in np.unique(positions // n):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(n)
        in_epoch = positions // n == epoch
        out[in_epoch] = permutation[positions[in_epoch] % n]
    return torch.from_numpy(out)
