"""Plots for the audit, the evaluation and the report: matplotlib off-screen, PNG bytes out."""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and in CI);
    imported on first use, so commands that draw nothing do not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Any) -> bytes:
    """The figure as a PNG, laid out tight; the figure is closed (no figures pile up)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return buffer.getvalue()
