"""matplotlib for every ``--plot`` (benchmarks, the planner, the serving comparison).

Torch-free, like the planner. One contract everywhere: without matplotlib, :func:`pyplot`
raises :class:`PlotUnavailable`, an ``ImportError`` (and a ``RuntimeError``, which the
planner's CLI reports) whose message says what to install.
"""

from __future__ import annotations

from typing import Any


class PlotUnavailable(ImportError, RuntimeError):
    """matplotlib is missing; the message names the install command."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib") from exc
    return plt
