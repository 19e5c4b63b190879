"""report.figure.save_figure: the PNG lands where asked (folders made) and the figure is closed."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from patchtrace.report.figure import save_figure


def test_save_figure_writes_png_makes_folders_and_closes(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    num = fig.number
    out = save_figure(fig, tmp_path / "a" / "b" / "c.png", dpi=50)
    assert out == tmp_path / "a" / "b" / "c.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert num not in plt.get_fignums()
    w, h = plt.imread(out).shape[1], plt.imread(out).shape[0]
    assert (w, h) == (100, 50)  # 2x1 inches at 50 dpi
