"""Writing a matplotlib figure to disk: the one place every picture of patchtrace goes through.

Heatmaps, circuit graphs, faithfulness curves and text-to-image grids all end the same way: lay
the figure out, make the folder, save the PNG at a fixed resolution, and close the figure so a long
sweep that draws hundreds of pictures does not keep them all in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path, dpi: int = 110, pad: float | None = None) -> Path:
    """Lay out ``fig`` (``tight_layout``, with ``pad`` if given), write it to ``path`` (creating
    parent folders) at ``dpi``, close it, and return the path."""
    import matplotlib.pyplot as plt

    if pad is None:
        fig.tight_layout()
    else:
        fig.tight_layout(pad=pad)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return p
