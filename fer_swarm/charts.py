"""Charts through matplotlib, an optional extra (``pip install 'fer-swarm[plot]'``), never needed on a Pi.

matplotlib is imported only when a chart is drawn, and drawn with its Agg
backend on a bare ``Figure``: no display, no pyplot global state, so a chart
can be made from any thread and leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FerSwarmError

INSTALL = "pip install 'fer-swarm[plot]'"


class ChartsUnavailable(FerSwarmError):
    """matplotlib, the optional ``plot`` extra, is not installed."""


def require() -> None:
    """Raise ChartsUnavailable, saying what to install, unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        raise ChartsUnavailable(f"charts need matplotlib, an optional extra: {INSTALL} ({e})") from None


def figure(**kwargs: Any):
    """A new matplotlib ``Figure`` on the Agg canvas (``kwargs`` as for ``Figure``)."""
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path``; OSError if the file cannot be written."""
    fig.savefig(path, dpi=dpi, format="png")
    return path
