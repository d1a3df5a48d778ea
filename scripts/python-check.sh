#!/usr/bin/env bash
# The Python package as CI checks it, on a machine without a GPU: build the
# wheel with maturin (installed into a throwaway virtual environment), install
# it into a fresh virtual environment that has nothing else (no PyTorch),
# import it and run python/tests/test_no_gpu.py against it.
#
# A debug build by default, which reuses what `cargo test` built;
# LINKREDUCE_WHEEL_PROFILE=release builds the wheel `pip install .` builds.
# LINKREDUCE_WHEEL_OUT=DIR keeps the tested wheel there (stage-gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
python="${PYTHON:-python3}"
"$python" - <<'PY'
import sys
if sys.version_info < (3, 9):
    sys.exit(f"python-check: {sys.executable} is Python {sys.version.split()[0]}; the package needs 3.9 or later (set PYTHON)")
PY

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A virtual environment at $1: the standard venv module, or virtualenv from
# PyPI where the system Python lacks venv/ensurepip (Debian without
# python3-venv).
make_venv() {
  if ! "$python" -m venv "$1" >/dev/null 2>&1; then
    rm -rf "$1"
    "$python" -m pip install --quiet --disable-pip-version-check --target "$work/virtualenv" virtualenv
    PYTHONPATH="$work/virtualenv" "$python" -m virtualenv --quiet "$1"
  fi
}

echo "python-check: building the wheel" >&2
make_venv "$work/build"
"$work/build/bin/python" -m pip install --quiet --disable-pip-version-check 'maturin>=1.9.4,<2'
profile=()
[ "${LINKREDUCE_WHEEL_PROFILE:-debug}" = release ] && profile=(--release)
"$work/build/bin/maturin" build "${profile[@]}" --out "$work/dist"
wheels=("$work"/dist/linkreduce-*-cp39-abi3-*.whl)
if [ ! -f "${wheels[0]}" ]; then
  echo "python-check: no abi3 wheel for CPython 3.9+ in $work/dist: $(ls "$work/dist")" >&2
  exit 1
fi

if [ -n "${LINKREDUCE_WHEEL_OUT:-}" ]; then
  mkdir -p "$LINKREDUCE_WHEEL_OUT"
  cp "${wheels[0]}" "$LINKREDUCE_WHEEL_OUT/"
fi

echo "python-check: installing $(basename "${wheels[0]}") into a fresh environment" >&2
make_venv "$work/test"
"$work/test/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "${wheels[0]}"
# From outside the repository, so that the installed package is what imports.
cd "$work"
"$work/test/bin/python" -c 'import linkreduce; print("python-check: import linkreduce", linkreduce.__version__, "from", linkreduce.__file__)'
"$work/test/bin/python" "$repo/python/tests/test_no_gpu.py"
