"""Drawing images from a trained EDM denoiser: solvers, guidance, seeded noise (see `solvers`)."""

from unpersonal.sampling.solvers import (
    SOLVERS,
    Denoiser,
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
    "Denoiser",
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
