#!/usr/bin/env bash
# `make sdist-check`: the package as a user gets it. Builds the sdist from a clean copy of
# the working tree (tracked and untracked-not-ignored files, as a clone would have them
# after a commit), installs it with pip into a fresh venv outside the checkout and runs
# .ci/smoke_installed.py there, from outside the checkout.
# The fresh venv reuses .venv's packages (torch, triton, setuptools) through a .pth file:
# nothing is downloaded (pip runs with --no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=$root/${VENV:-.venv}/bin/python
[ -x "$py" ] || { echo "sdist-check: $py not found (run \`make setup\` first)" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/mmfast-sdist-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log=$tmp/log
step() { echo "sdist-check: [${SECONDS}s] $1"; }
quiet() {  # run "$@" with its output in $log, shown only when it fails
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; echo "sdist-check: FAILED: $*" >&2; exit 1; fi
}

step "sdist from a clean copy of the working tree"
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$tmp/src"
(cd "$tmp/src" && quiet "$py" -c \
  'import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])' "$tmp/dist")
sdist=$(ls "$tmp"/dist/mmfast-*.tar.gz)
step "$(basename "$sdist"): $(tar tzf "$sdist" | grep -vc '/$') files"

step "fresh venv in $tmp/venv, reusing the packages of $py"
base=$("$py" -c 'import sys; print(sys._base_executable)')
# --without-pip: a fresh 3.11 venv would otherwise ship setuptools 65.5, which shadows
# .venv's and cannot read pyproject's `license = "MIT"`. .venv's pip installs into it
# (`pip --python`), and builds with the venv's interpreter, so with .venv's setuptools.
quiet "$base" -m venv --without-pip "$tmp/venv"
vpy=$tmp/venv/bin/python
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Plain paths (the .pth files inside them are not run: .venv's editable mmfast stays out).
"$py" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' >"$site/zz_reuse_venv.pth"
"$vpy" - <<'PY'
import setuptools, torch
assert int(setuptools.__version__.split(".")[0]) >= 77, setuptools.__file__
print(f"sdist-check: building with setuptools {setuptools.__version__}, torch {torch.__version__}")
PY

step "pip install $(basename "$sdist") (compiles mmfast._C; dependencies must already be there: --no-index)"
export PATH="$PATH:$(dirname "$py")"  # ninja, if not on PATH already
export MAX_JOBS=${MAX_JOBS:-2}
# -O1: this checks the package (every source there, it compiles, installs and runs), not its
# speed; at -O3 csrc/cpu/kernels_multi.cpp alone takes ~4.5 min of one core. `make test`
# builds and tests the -O3 extension. MMFAST_CXX_OPT=-O3 make sdist-check checks that too.
export MMFAST_CXX_OPT=${MMFAST_CXX_OPT:--O1}
start=$SECONDS
(cd "$tmp" && quiet "$py" -m pip --python "$vpy" install -q --no-index --no-build-isolation "$sdist")
step "built ($MMFAST_CXX_OPT) and installed in $((SECONDS - start)) s"

step "smoke test of the installed package, cwd $tmp"
(cd "$tmp" && "$vpy" -I "$root/.ci/smoke_installed.py" "$root")
step "done"
