"""Drawing images from a trained EDM denoiser: solvers, guidance, seeded noise (see `solvers`).

    solvers    the ODE solvers and guidance, on any denoiser (exported here)
    sampler    a published denoiser with the training images' conditions: draws in batches
    schedule   sources, noise seeds and guidance weights, pure functions of the config
    draw       `unpersonal sample`: unfiltered images and a real-vs-synthetic grid
    search     `generate`'s per-source search, over a draw and a judge callable
    judge      the privacy filter and label divergence a candidate is judged by
    blocks     `generate`'s blocks: sharding, saving, resuming
    generate   `unpersonal generate`: the data flow from sampler to the published set
"""

from unpersonal.sampling.solvers import (
    SOLVERS,
    DenoiserProtocol,
    DenoiseFn,
    GuidedDenoiser,
    SampleResult,
    dpmpp_2m_sample,
    heun_sample,
    initial_noise,
    karras_sigmas,
    sample,
    solver_evaluations,
)

__all__ = [
    "SOLVERS",
    "DenoiserProtocol",
    "DenoiseFn",
    "GuidedDenoiser",
    "SampleResult",
    "dpmpp_2m_sample",
    "heun_sample",
    "initial_noise",
    "karras_sigmas",
    "sample",
    "solver_evaluations",
]
