"""Test a SLaK config of segmentation/configs: `python segmentation/test.py CONFIG CHECKPOINT [--launcher pytorch]`.

See segmentation/launch.py for the options and docs/dense_prediction.md for examples.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segmentation.launch import main  # noqa: E402
from utils import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main, "test")
