#!/usr/bin/env bash
# Fill gpu_carry/ (git-ignored) with what benchmarks/gpu_check.sh needs on the device machine, which
# reaches no package registry: wheels of the packages its image lacks, the gsplat source distribution
# (compiled there for the H200), and the nerf_synthetic_blocks dataset. Run it here, in the repository:
#   bash benchmarks/prepare_gpu_carry.sh
# then make the device call with carry ["gpu_carry"] (docs/results/gpu.md has the exact call).
#
# The device image runs Python 3.12 (CPython, x86-64, manylinux): /work/.library/device/KINDS.md.
# Its image already holds torch, lightning, torchmetrics, tensorboard, numpy, scipy, pillow, pyyaml,
# pytest, pytest-timeout, ninja, jaxtyping and rich (gsplat's needs), so only the rest is fetched.
# Versions are pinned to the ones this project is tested with here.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-$REPO/.venv/bin/python}
CARRY=gpu_carry
WHEELS=$CARRY/wheels
DATA_SRC=${SHARED_DATA:-$REPO/../shared/data}/nerf_synthetic_blocks
LIMIT_MIB=64

WHEEL_PINS=(
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  lpips==0.1.4 geoopt==0.5.1 plyfile==1.1.5
)
GSPLAT_PIN=gsplat==1.5.3

git check-ignore -q "$CARRY/" || { echo "error: $CARRY/ is not git-ignored (add it to .gitignore)" >&2; exit 1; }
[[ -f $DATA_SRC/transforms_train.json ]] || { echo "error: no dataset at $DATA_SRC (set SHARED_DATA)" >&2; exit 1; }
rm -rf "$CARRY"
mkdir -p "$WHEELS" "$CARRY/data"

echo "== wheels for CPython 3.12 / manylinux x86-64: ${WHEEL_PINS[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "${WHEEL_PINS[@]}"

echo "== $GSPLAT_PIN source distribution (its metadata step imports torch, hence no build isolation)"
"$PY" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: -d "$WHEELS" "$GSPLAT_PIN"

echo "== dataset $DATA_SRC"
cp -r "$DATA_SRC" "$CARRY/data/"
rm -rf "$CARRY/data/nerf_synthetic_blocks/__pycache__"

# What travels is the working tree (tracked and untracked-not-ignored files) plus the carried paths.
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry_bytes=$(du -sb "$CARRY" | cut -f1)
total=$((tree_bytes + carry_bytes))
ls -l "$WHEELS"
awk -v c="$carry_bytes" -v t="$tree_bytes" -v l="$LIMIT_MIB" -v d="$CARRY" 'BEGIN {
  m = 1048576; printf "carry %s: %.1f MiB; working tree %.1f MiB; total %.1f MiB of the %d MiB limit\n", d, c / m, t / m, (c + t) / m, l }'
if ((total > LIMIT_MIB * 1048576)); then
  echo "error: over the device machine's $LIMIT_MIB MiB transfer limit" >&2
  exit 1
fi
