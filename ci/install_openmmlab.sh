#!/usr/bin/env bash
# Install MMEngine, MMCV 2.1.0 with its compiled ops, MMSegmentation 1.2.2 and MMDetection 3.3.0
# into the current Python environment (the one `python` runs), next to this project's torch.
#
# Why a source build: MMCV publishes no wheels on PyPI, mmcv-lite lacks the compiled ops that
# `import mmseg` and MMDetection's RoIAlign / NMS need, and MMCV 2.1.0's setup.py (a) imports
# pkg_resources, gone from current setuptools, and (b) compiles with -std=c++17 while torch >= 2.10
# headers need C++20. This script patches exactly those two things in the unpacked sdist and builds
# a wheel against the installed torch: CPU ops only without a GPU, CPU and CUDA ops where
# torch.cuda.is_available() (or FORCE_CUDA=1) and nvcc is found.
#
# Idempotent: exits at once when everything imports; the built wheel is kept under
# $SLAK_OPENMMLAB_CACHE (default ~/.cache/slak-openmmlab), keyed by torch and Python version, so a
# second environment installs it in seconds. Build parallelism: MAX_JOBS (default: all cores).
set -euo pipefail
start=$(date +%s)
PYTHON=${PYTHON:-python}
MMCV_VERSION=2.1.0
PACKAGES=(mmengine==0.10.7 mmsegmentation==1.2.2 mmdet==3.3.0
          # imported by mmseg / mmdet at import time but not declared by their wheels
          ftfy regex)

elapsed() { echo "$(( $(date +%s) - start )) s"; }

if "$PYTHON" -c "import mmcv.ops, mmseg.models, mmdet.models" 2>/dev/null; then
  echo "install_openmmlab: MMCV with ops, MMSegmentation and MMDetection already import ($(elapsed))"
  exit 0
fi

"$PYTHON" -c "import torch" 2>/dev/null || {
  echo "install_openmmlab: install torch first (pip install -r requirements.txt)" >&2; exit 1; }

"$PYTHON" -m pip install -q "${PACKAGES[@]}"
echo "install_openmmlab: mmengine, mmsegmentation, mmdet installed ($(elapsed))"

if ! "$PYTHON" -c "import mmcv.ops" 2>/dev/null; then
  # mmcv-lite (pure Python) would shadow the build below; it has no ops.
  "$PYTHON" -m pip uninstall -q -y mmcv-lite 2>/dev/null || true
  tag=$("$PYTHON" -c "import sys, torch; print('torch' + torch.__version__.replace('+', '-')
        + '-py%d%d' % sys.version_info[:2] + ('-cuda' if torch.cuda.is_available() else '-cpu'))")
  cache=${SLAK_OPENMMLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slak-openmmlab}/$tag
  mkdir -p "$cache"
  wheel=$(ls "$cache"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The sdist's metadata step imports pkg_resources too: give pip's isolated build environment
    # a setuptools that still has it (this constraint applies to this download only).
    echo "setuptools<70" > "$work/constraints.txt"
    PIP_CONSTRAINT="$work/constraints.txt" "$PYTHON" -m pip download -q --no-deps \
      --no-binary :all: -d "$work" "mmcv==$MMCV_VERSION"
    tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    "$PYTHON" - "$src/setup.py" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old_import = "from pkg_resources import DistributionNotFound, get_distribution, parse_version"
cxx_flags = "extra_compile_args['cxx'] = ['-std=c++17']"
assert old_import in text and cxx_flags in text, "unexpected mmcv setup.py; update the patch"
text = text.replace(old_import, (
    "from importlib.metadata import PackageNotFoundError as DistributionNotFound\n"
    "from importlib.metadata import distribution as get_distribution\n"
    "from packaging.version import parse as parse_version"))
# torch >= 2.10 headers use C++20; -g0 drops the debug info that only slows the build down.
text = text.replace(cxx_flags, "extra_compile_args['cxx'] = ['-std=c++20', '-g0']")
text = text.replace("'-std=c++17'", "'-std=c++20'")
open(path, "w").write(text)
EOF
    echo "install_openmmlab: building mmcv $MMCV_VERSION ops against torch ($tag), MAX_JOBS=${MAX_JOBS:-$(nproc)} ($(elapsed))"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip wheel -q --no-build-isolation \
      --no-deps -w "$cache" "$src"
    wheel=$(ls "$cache"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    echo "install_openmmlab: built $(basename "$wheel") ($(elapsed))"
  fi
  "$PYTHON" -m pip install -q "$wheel"
fi

"$PYTHON" -c "import mmcv.ops, mmseg.models, mmdet.models; import mmcv, mmseg, mmdet; \
print('install_openmmlab: mmcv', mmcv.__version__, 'mmseg', mmseg.__version__, 'mmdet', mmdet.__version__)"
echo "install_openmmlab: done ($(elapsed))"
