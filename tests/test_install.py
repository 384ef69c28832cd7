"""The project as users install it: ``pip install .`` and ``pip install -e .`` into a fresh
environment provide every top-level module and package of the checkout, the scripts of the
sub-folders then run by path from anywhere (and say in one line when it is not installed), and
``torch.hub.load`` builds the models from ``hubconf.py`` with a checkpoint's weights."""
import json
import os
import shutil
import site
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import SLaK  # noqa: F401 - registers the SLaK models
from conftest import REPO

TINY = dict(width_factor=0.25, kernel_size=[13, 11, 9, 7, 3], Decom=True, num_classes=4)
# What the installation must provide: every top-level module but hubconf (torch.hub reads it from
# the checkout) and every package, as the checkout holds them.
MODULES = sorted(p.stem for p in REPO.glob("*.py") if p.stem != "hubconf")
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")


def fresh_venv(path):
    """A venv at ``path`` without this project, seeing this interpreter's packages (torch, timm,
    pip, setuptools) so that nothing is downloaded or rebuilt; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(path)], check=True)
    python = path / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Running inside a venv itself: --system-site-packages reaches the base interpreter's
        # packages, not this venv's, so name those in a .pth (read after the new venv's own).
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(purelib, "_outer_env.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
    return python


def run(python, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not the checkout
    return subprocess.run([str(python), *map(str, args)], cwd=cwd, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def copy_of_checkout(dest):
    """The checkout's files without build outputs (pip builds in the source tree) or tests."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", "tests", "build", "*.egg-info", "__pycache__", ".venv", "output*", "runs",
        ".pytest_cache", "work_dirs"))
    return dest


IMPORTS = """
import importlib, json, sys
modules, packages, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
files = {name: importlib.import_module(name).__file__ for name in modules + packages}
print(json.dumps(sorted(name for name, file in files.items() if not file.startswith(root))))
"""

HUB = """
import json, sys, torch
repo, checkpoint, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
x = torch.randn(2, 3, 64, 64)
model = torch.hub.load(repo, "SLaK_tiny", source="local", checkpoint=checkpoint, **kwargs).eval()
with torch.no_grad():
    logits = model(x).tolist()
try:
    torch.hub.load(repo, "SLaK_tiny", source="local", pretrained=True, **kwargs)
    error = None
except ValueError as exc:
    error = str(exc)
print(json.dumps(dict(logits=logits, error=error)))
"""


@pytest.mark.parametrize("editable", [False, True], ids=["copy", "editable"])
def test_installed_project_imports_runs_and_loads_through_torch_hub(editable, tmp_path):
    src = copy_of_checkout(tmp_path / "src")
    python = fresh_venv(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"  # outside the checkout and its copy
    elsewhere.mkdir()
    matrix = elsewhere / "erf.npy"
    np.save(matrix, np.random.default_rng(0).random((64, 64)))
    analyze = [src / "erf" / "analyze_erf.py", "--source", matrix, "--heatmap_save",
               elsewhere / "erf.png"]

    # Not installed yet: a script of a sub-folder says what to do, in one line (unless this
    # environment, which the venv sees, has the project installed already).
    if run(python, "-c", "import utils", cwd=elsewhere).returncode != 0:
        result = run(python, *analyze, cwd=elsewhere)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert "install the repository first (pip install -e . in its root)" in lines[0]

    install = ["-e", src] if editable else [src]
    result = run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                 "--disable-pip-version-check", *install, cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    # Every module and package imports from the installation (an editable one maps them to the
    # copy; a plain one holds its own files in the venv).
    root = src if editable else tmp_path / "venv"
    result = run(python, "-c", IMPORTS, json.dumps(MODULES), json.dumps(PACKAGES), root,
                 cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], "imported from elsewhere"

    # The README's commands, by path, from outside the checkout.
    result = run(python, *analyze, cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "erf.png").is_file() and "0.5" in result.stdout
    result = run(python, src / "segmentation" / "train.py", "--help", cwd=elsewhere)
    assert result.returncode == 0 and "--cfg-options" in result.stdout, result.stderr[-3000:]

    if editable:
        return  # torch.hub reads the checkout, not the installation: once is enough
    # torch.hub from the checkout: the checkpoint's weights, and a clear word on pretrained=True.
    torch.manual_seed(1)
    model = timm.create_model("SLaK_tiny", **TINY).eval()
    checkpoint = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, checkpoint)
    result = run(python, "-c", HUB, REPO, checkpoint, json.dumps(TINY), cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.randn(2, 3, 64, 64))
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=1e-5)
    assert "no weights are hosted" in out["error"] and "checkpoint=" in out["error"]
