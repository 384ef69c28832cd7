#!/usr/bin/env bash
# timm's own model tests for every SLaK model: tests/test_models.py of the installed timm's source
# distribution, downloaded here and run unmodified (a conftest.py beside it imports SLaK, which
# registers the models before the file collects its cases). Prints the pass count; exits non-zero
# unless every required case passes (a skipped one counts as not passed).
# Usage: bash ci/timm_model_tests.sh   (in the environment that runs the suite)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
version="$(python -c 'import timm; print(timm.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip download -q --no-deps --no-binary :all: "timm==$version" -d "$work/sdist"
# Only the test file and the pyproject.toml that registers its pytest markers; timm itself is
# the installed one.
tar -xzf "$work"/sdist/timm-*.tar.gz -C "$work" --strip-components=1 \
  "timm-$version/tests/test_models.py" "timm-$version/pyproject.toml"
cat > "$work/tests/conftest.py" <<EOF
import sys
sys.path.insert(0, "$repo")
import SLaK  # noqa: E402,F401  registers SLaK_tiny, SLaK_small, SLaK_base, SLaK_large
EOF

tests=(test_model_forward test_model_backward test_model_default_cfgs test_model_forward_features
       test_model_forward_fx test_model_backward_fx)
expected=$(( ${#tests[@]} * $(python -c "import sys; sys.path.insert(0, '$repo'); import SLaK, timm; print(len(timm.list_models('SLaK*')))") ))

# The file's GitHub-runner settings skip models over 100M parameters in the FX backward test
# (SLaK_large); run every case as the file does on other machines. Its timeout marks are for
# pytest-timeout, which the suite does not install.
status=0
(cd "$work" && env -u GITHUB_ACTIONS python -m pytest -q -p no:cacheprovider \
  -W ignore::pytest.PytestUnknownMarkWarning "${tests[@]/#/tests/test_models.py::}" -k SLaK \
  --junitxml="$work/report.xml") || status=$?

python - "$work/report.xml" "$expected" "$version" <<'EOF'
import sys
import xml.etree.ElementTree as ET

report, expected, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cases = list(ET.parse(report).iter("testcase"))
passed = [c for c in cases if not any(c.find(t) is not None for t in ("failure", "error", "skipped"))]
print(f"timm {version} tests/test_models.py: {len(passed)} of {expected} SLaK cases passed")
for case in cases:
    if case not in passed:
        print(f"  not passed: {case.get('name')}")
sys.exit(0 if len(passed) == len(cases) == expected else 1)
EOF
exit "$status"
