"""Test a SLaK config of segmentation/configs: `python segmentation/test.py CONFIG CHECKPOINT [--launcher pytorch]`.

See segmentation/launch.py for the options and docs/dense_prediction.md for examples.
"""
import sys

try:  # the repository's modules come from its installation (pip install -e .)
    from segmentation.launch import main
    from utils import run_cli
except ModuleNotFoundError as exc:
    if exc.name not in ("segmentation", "utils"):
        raise
    sys.exit(f"error: {__file__} imports this repository's modules ({exc.name} not found): "
             f"install the repository first (pip install -e . in its root)")

if __name__ == "__main__":
    run_cli(main, "test")
