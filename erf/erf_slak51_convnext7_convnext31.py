"""Side-by-side ERF heatmaps of three models (the paper's ConvNeXt 7 / ConvNeXt 31 / SLaK 51 figure).

    python erf/erf_slak51_convnext7_convnext31.py \
        --sources convnext7.npy convnext31.npy slak51.npy \
        --titles "ConvNeXt (7x7)" "ConvNeXt (31x31)" "SLaK (51x51)" --save_path erf_figure.png

Each ``.npy`` is a matrix from ``visualize_erf.py``; each panel shows it log-scaled and divided by
its maximum (as ``analyze_erf.py`` does), on one shared colour scale, titled with the share-0.5
high-contribution area ratio. Without ``--sources`` (the original release's command,
``python erf/erf_slak51_convnext7_convnext31.py``) the matrices are ``erf/convnext7_erf.npy``,
``erf/convnext31_erf.npy`` and ``erf/slak_tiny_erf.npy``, where docs/erf.md's commands save them.
"""
from pathlib import Path

import numpy as np
# The sibling script (python erf/<this>.py puts erf/ first on sys.path); it stops with one
# line when the repository is not installed.
from analyze_erf import draw_heatmap, high_contribution_area, load_matrix, normalise
from utils import ArgumentParser, ConfigError, run_cli

DEFAULT_TITLES = ["ConvNeXt (7x7)", "ConvNeXt (31x31)", "SLaK (51x51)"]
# Where docs/erf.md's visualize_erf.py commands save the three matrices (this folder).
DEFAULT_SOURCES = [str(Path(__file__).resolve().parent / name)
                   for name in ("convnext7_erf.npy", "convnext31_erf.npy", "slak_tiny_erf.npy")]


def save_figure(matrices, titles, path):
    """Save one row of heatmaps, one per (H, W) matrix, with a shared colour bar, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 4.4),
                             layout="constrained")
    for ax, matrix, title in zip(np.atleast_1d(axes), matrices, titles):
        data = normalise(matrix)
        found = high_contribution_area(data, 0.5)
        ratio = f"area ratio (t=0.5) {found[1]:.3f}" if found else "area ratio (t=0.5) -"
        image = draw_heatmap(ax, data, f"{title}\n{ratio}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="log-scaled contribution")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = ArgumentParser("ERF figure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs=3, default=None, metavar="NPY",
                        help="three matrices saved by visualize_erf.py, left to right (default: "
                             "erf/convnext7_erf.npy erf/convnext31_erf.npy erf/slak_tiny_erf.npy)")
    parser.add_argument("--titles", nargs=3, default=DEFAULT_TITLES, metavar="TITLE")
    parser.add_argument("--save_path", default="erf_slak51_convnext7_convnext31.png")
    args = parser.parse_args(argv)
    sources = args.sources or DEFAULT_SOURCES
    matrices = []
    for source in sources:
        if not Path(source).is_file():
            if args.sources is None:
                raise ConfigError(f"{source}: no such file; save the three matrices there first "
                                  f"(python erf/visualize_erf.py ... --save_path erf/{Path(source).name}, "
                                  f"see docs/erf.md) or pass --sources")
            raise ConfigError(f"--sources {source}: no such file; pass .npy files written by "
                              f"visualize_erf.py --save_path")
        matrix = load_matrix(source, "--sources")
        matrices.append(matrix)
    save_figure(matrices, args.titles, args.save_path)
    print(f"saved {args.save_path}")


if __name__ == "__main__":
    run_cli(main)
