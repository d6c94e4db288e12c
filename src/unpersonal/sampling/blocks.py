"""`generate`'s blocks on disk: which sources a block holds, which blocks a process owns, and
the finished blocks a rerun resumes from.

    work/block-000012.npz   a finished block (`Block`): kept images and decision rows

A block is the unit of resuming and of sharding. It is saved atomically once finished, so a
kill loses at most the blocks in progress, and a process skips every block already saved.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from unpersonal.rundir import write_npz_atomic
from unpersonal.sampling.search import Block

DECISION_PREFIX = "decision_"


def block_count(n_sources: int, block_size: int) -> int:
    return -(-n_sources // block_size)


def block_positions(block: int, block_size: int, n_sources: int) -> np.ndarray:
    """The positions (in the source order) of a block's sources."""
    return np.arange(block * block_size, min((block + 1) * block_size, n_sources), dtype=np.int64)


def owned_blocks(n_blocks: int, process_index: int, num_processes: int) -> list[int]:
    """The blocks one process generates: every `num_processes`-th, from its index on. Which
    process makes a block changes nothing in it."""
    return [b for b in range(n_blocks) if b % num_processes == process_index]


def block_path(work: Path, block: int) -> Path:
    return work / f"block-{block:06d}.npz"


def finished_blocks(work: Path, blocks: list[int]) -> list[int]:
    """Those of `blocks` already saved in `work`: a rerun resumes after them."""
    return [b for b in blocks if block_path(work, b).is_file()]


def save_block(path: Path, block: Block) -> None:
    arrays = {f.name: getattr(block, f.name) for f in fields(Block) if f.name != "decisions"}
    write_npz_atomic(path, **arrays, **{f"{DECISION_PREFIX}{name}": values
                                        for name, values in block.decisions.items()})


def load_block(path: Path) -> Block:
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    decisions = {name.removeprefix(DECISION_PREFIX): arrays.pop(name)
                 for name in list(arrays) if name.startswith(DECISION_PREFIX)}
    return Block(**{**arrays, "evaluations": int(arrays["evaluations"]),
                    "seconds": float(arrays["seconds"])}, decisions=decisions)
