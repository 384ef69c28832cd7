"""High-contribution area ratios and a heatmap of an ERF contribution matrix.

    python erf/analyze_erf.py --source slak_tiny_erf.npy --heatmap_save slak_tiny_erf.png

The matrix from ``visualize_erf.py`` is log-scaled, ``log10(1 + m)``, and divided by its maximum
(scores differ by orders of magnitude). For each threshold t in 0.2, 0.3, 0.5, 0.99 the table gives
the side length of the smallest square centred on the image that holds at least a share t of the
total of that normalised matrix, and the square's area as a fraction of the image. The table is
printed and written as JSON beside the heatmap (``slak_tiny_erf.json`` above).
"""
import json
import sys
from pathlib import Path

import numpy as np

try:  # the repository's modules come from its installation (pip install -e .)
    from utils import ArgumentParser, ConfigError, run_cli
except ModuleNotFoundError as exc:
    if exc.name != "utils":
        raise
    sys.exit(f"error: {__file__} imports this repository's modules ({exc.name} not found): "
             f"install the repository first (pip install -e . in its root)")

__all__ = ["THRESHOLDS", "normalise", "high_contribution_area", "area_table", "save_heatmap",
           "main"]

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def normalise(matrix):
    """``log10(1 + matrix) / max``: the (H, W) matrix the table and the heatmap are made of."""
    data = np.log10(1 + np.clip(np.asarray(matrix, dtype=np.float64), 0, None))
    peak = data.max()
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError("the contribution matrix is all zero or not finite; recompute it with "
                         "visualize_erf.py")
    return data / peak


def high_contribution_area(data, threshold):
    """Smallest centred square of ``data`` (H, W) holding a share >= ``threshold`` of its sum.

    Squares grow one ring at a time around the centre: odd sides (1, 3, 5...) when ``min(H, W)``
    is odd, even sides (2, 4, ...) when it is even, so every square is symmetric about the centre
    of a square matrix. Returns ``(side, side**2 / (H * W))``, or ``None`` when no square does
    (possible only for non-square matrices).
    """
    h, w = data.shape
    total = data.sum()
    # Integral image: the sum over any rectangle in O(1).
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = data.cumsum(0).cumsum(1)
    for side in range(2 - min(h, w) % 2, min(h, w) + 1, 2):
        top, left = (h - side) // 2, (w - side) // 2
        bottom, right = top + side, left + side
        inside = (integral[bottom, right] - integral[top, right] - integral[bottom, left]
                  + integral[top, left])
        # A relative tolerance so that the full square of a square matrix always qualifies.
        if inside >= threshold * total * (1 - 1e-12):
            return side, side * side / (h * w)
    return None


def area_table(matrix, thresholds=THRESHOLDS):
    """Rows ``{"threshold", "side_length", "area_ratio"}`` for the raw contribution ``matrix``."""
    data = normalise(matrix)
    rows = []
    for threshold in thresholds:
        found = high_contribution_area(data, threshold)
        side, ratio = found if found else (None, None)
        rows.append(dict(threshold=threshold, side_length=side, area_ratio=ratio))
    return rows


def format_table(rows):
    lines = [f"{'threshold':>9}  {'side length':>11}  {'area ratio':>10}"]
    for row in rows:
        side = "-" if row["side_length"] is None else str(row["side_length"])
        ratio = "-" if row["area_ratio"] is None else f"{row['area_ratio']:.4f}"
        lines.append(f"{row['threshold']:>9}  {side:>11}  {ratio:>10}")
    return "\n".join(lines)


def draw_heatmap(ax, data, title=None):
    """Draw a normalised matrix on ``ax``; returns the image for a colour bar."""
    image = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return image


def save_heatmap(data, path, title=None):
    """Save the normalised (H, W) ``data`` as a PNG heatmap with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the user's default backend is
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    image = draw_heatmap(ax, data, title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="log-scaled contribution")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def load_matrix(path, flag):
    """The (H, W) matrix saved by ``visualize_erf.py`` at ``path``; ``ConfigError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file; pass the .npy written by "
                          f"visualize_erf.py --save_path")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ConfigError(f"{flag} {path} is not a readable .npy file ({str(err)[:120]}); "
                          f"recompute it with visualize_erf.py") from None
    if matrix.ndim != 2:
        raise ConfigError(f"{flag} {path} holds an array of shape {matrix.shape}, not an (H, W) "
                          f"matrix; pass the .npy written by visualize_erf.py")
    return matrix


def get_args_parser():
    parser = ArgumentParser("ERF analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help=".npy matrix saved by visualize_erf.py")
    parser.add_argument("--heatmap_save", default="heatmap.png",
                        help="heatmap PNG; the table goes to the same name with .json")
    return parser


def main(args):
    source = Path(args.source)
    matrix = load_matrix(source, "--source")
    try:
        data = normalise(matrix)
    except ValueError as err:
        raise ConfigError(f"--source {source}: {err}") from None
    rows = area_table(matrix)
    print(f"{source}: {matrix.shape[0]}x{matrix.shape[1]}, contribution min {matrix.min():.3g} "
          f"max {matrix.max():.3g}")
    print("high-contribution area ratio (smallest centred square holding the share):")
    print(format_table(rows))

    heatmap = Path(args.heatmap_save)
    save_heatmap(data, heatmap)
    table_path = heatmap.with_suffix(".json")
    table_path.write_text(json.dumps(dict(source=str(source), shape=list(matrix.shape),
                                          table=rows), indent=2) + "\n")
    print(f"saved {heatmap} and {table_path}")
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
