#!/usr/bin/env bash
# Every CUDA path of the project in one device call of at most 9 minutes (docs/results/gpu.md):
#   install  carried wheels (no registry there), then this package (editable, no deps)
#   build    gsplat's CUDA code for the H200 only (sm_90), timed; the project's C++ rasterizer beside it
#   pytest   the gsplat parity tests and tests/splatting/test_cuda_paths.py (render, module, Grendel+NCCL)
#   bench    benchmarks/gpu_render.py: our render path against gsplat.rasterization (1M, 1920x1080, SH 3)
#   grendel  the grendel_gpu.yaml recipe on one GPU (NCCL), a few steps with a validation pass
#   train    blender.yaml at 800 px with the gsplat backend, 2000 steps (or what fits), then test
# Prepare here first: bash benchmarks/prepare_gpu_carry.sh (fills the git-ignored gpu_carry/).
# $OUT gets results.md, logs.txt (every step's log) and the gsplat wheel built there (the device returns
# at most 8 files): put that wheel in gpu_carry/wheels and a later call installs it instead of building.
# Each step runs in its own shell under a timeout cut to what is left of GPU_CHECK_BUDGET_S; a failed
# step does not stop the later ones, and the script exits 1 naming every step that failed.
# Local dry runs: GPU_CHECK_ONLY="bench train" and the GPU_CHECK_TRAIN_* / GPU_CHECK_BENCH_ARGS overrides.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
CARRY=${GPU_CARRY:-$REPO/gpu_carry}
WHEELS=$CARRY/wheels
DATA=$CARRY/data/nerf_synthetic_blocks
STATE=${GPU_CHECK_STATE:-/tmp/gpu_check_state}
BUDGET_S=${GPU_CHECK_BUDGET_S:-500}
PY=${PYTHON:-python3}
STEPS=(env install build pytest bench grendel train)

common_env() {
  export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
  export LIGHTNING_GRENDEL_LIVE_VIEWER=off  # the recipes' live view: no page to serve, and timed steps
  if [[ -z ${CUDA_HOME:-} ]]; then  # a wrapper nvcc on PATH makes torch guess a CUDA_HOME without headers
    for dir in /usr/local/cuda /usr/local/cuda-*; do
      if [[ -x $dir/bin/nvcc && -f $dir/include/cuda_runtime.h ]]; then export CUDA_HOME=$dir; break; fi
    done
  fi
  if [[ -f $STATE/env ]]; then source "$STATE/env"; fi
  cd "$REPO"
}

note() { echo "$*" >>"$STATE/note_$STEP"; echo "note: $*"; }
result() { echo "RESULT $1=$2" >>"$STATE/results.txt"; echo "RESULT $1=$2"; }

step_env() {
  nvidia-smi || true
  echo "python: $(command -v "$PY") $("$PY" -V 2>&1); nproc $(nproc); CUDA_HOME=${CUDA_HOME:-unset}"
  nvcc --version || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|lightning|torchmetrics|pytest|ninja|setuptools|numpy|jaxtyping|rich) ' || true
  note "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)')"
}

step_install() {
  [[ -d $WHEELS && -f $DATA/transforms_train.json ]] || { echo "no $WHEELS or $DATA: run benchmarks/prepare_gpu_carry.sh and carry gpu_carry" >&2; return 1; }
  local site ok=0
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [[ -w $site ]]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" 'jsonargparse[signatures]' lpips geoopt plyfile
    if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO"; then
      note "editable install failed: running from PYTHONPATH=$REPO"; ok=1
      echo "export PYTHONPATH=$REPO:\${PYTHONPATH:-}" >>"$STATE/env"
    fi
  else
    note "$site is read-only: wheels into /tmp/site, package from PYTHONPATH"
    "$PY" -m pip install --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
    echo "export PYTHONPATH=$REPO:/tmp/site:\${PYTHONPATH:-}" >>"$STATE/env"
  fi
  common_env
  "$PY" -c 'import jsonargparse, docstring_parser, typeshed_client, lpips, geoopt, plyfile, pytest, pytest_timeout
import lightning_grendel; print("imports ok; jsonargparse", jsonargparse.__version__)'
  "$PY" -m lightning_grendel --help >/dev/null
  return $ok
}

step_build() {
  local src=/tmp/gsplat-src std began built=/tmp/gsplat-wheel
  "$PY" -m lightning_grendel.splatting.rasterize.build >"$STATE/cpp_build.log" 2>&1 &
  local cpp_pid=$!
  if compgen -G "$WHEELS/gsplat-*.whl" >/dev/null; then  # built by an earlier call and carried back
    note "gsplat: carried wheel $(basename "$WHEELS"/gsplat-*.whl), not rebuilt"
    "$PY" -m pip install --no-index --no-deps "$WHEELS"/gsplat-*.whl
  else
    rm -rf "$src" "$built" && mkdir -p "$src" "$built"
    tar xzf "$WHEELS"/gsplat-*.tar.gz -C "$src"
    src=$(echo "$src"/gsplat-*)
    # gsplat 1.5.3 asks nvcc for C++17; torch headers that need C++20 (torch's own flag) fail under it.
    std=$("$PY" -c 'import inspect, torch.utils.cpp_extension as c; print("c++20" if "-std=c++20" in inspect.getsource(c) else "c++17")')
    if [[ $std == c++20 ]]; then sed -i 's/-std=c++17/-std=c++20/' "$src/setup.py"; note "gsplat built with -std=c++20 (torch needs it)"; fi
    began=$SECONDS
    "$PY" -m pip wheel -v --no-index --no-deps --no-build-isolation -w "$built" "$src"
    result gpu.gsplat_build_s $((SECONDS - began))
    "$PY" -m pip install --no-index --no-deps "$built"/gsplat-*.whl
    cp "$built"/gsplat-*.whl "$OUT"/ && note "wheel to \$OUT: $(du -h "$built"/gsplat-*.whl | cut -f1)"
  fi
  local cpp_rc=0
  wait "$cpp_pid" || cpp_rc=$?
  echo "--- C++ rasterizer build (beside it) ---"; cat "$STATE/cpp_build.log"
  [[ $cpp_rc == 0 ]] || { note "C++ rasterizer build failed"; return 1; }
  cd /tmp  # import the installed gsplat, not the source tree
  "$PY" -c 'from gsplat import csrc; import gsplat; print("gsplat", gsplat.__version__, "compiled module", csrc.__file__)'
}

check_junit() {  # fail when a selected test was skipped or none ran
  "$PY" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET

cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
skipped = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("skipped") is not None]
print(f"{len(cases)} tests, {len(skipped)} skipped")
sys.exit(1 if not cases or skipped else 0)
EOF
}

step_pytest() {
  local rc=0
  "$PY" -m pytest -q -rA -p no:cacheprovider --timeout 240 --junitxml="$STATE/parity.xml" \
    tests/splatting/rasterize/test_rasterize_cpp.py -k "gsplat and not without_cuda" || rc=1
  check_junit "$STATE/parity.xml" || { note "gsplat parity: failures or skips"; rc=1; }
  "$PY" -m pytest -q -rA -p no:cacheprovider --timeout 240 --junitxml="$STATE/cuda.xml" \
    tests/splatting/test_cuda_paths.py || rc=1
  check_junit "$STATE/cuda.xml" || { note "test_cuda_paths: failures or skips"; rc=1; }
  return $rc
}

step_bench() {
  local args
  read -ra args <<<"${GPU_CHECK_BENCH_ARGS:-}"
  "$PY" benchmarks/gpu_render.py "${args[@]}" | tee "$STATE/bench.txt"
  grep '^RESULT ' "$STATE/bench.txt" >>"$STATE/results.txt" || true
}

step_grendel() {
  local work=/tmp/grendel_cli
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  "$PY" -m lightning_grendel fit -c gaussian/grendel_gpu --trainer.devices 1 --data.path "$DATA" \
    --trainer.max_steps 30 --trainer.check_val_every_n_epoch 1 --trainer.limit_val_batches 2 --data.init_args.num_workers 0
  ls -R "$work/lightning_logs" | head -20
  [[ -n $(find "$work/lightning_logs" -name point_cloud.ply) ]] || { note "no point_cloud.ply exported"; return 1; }
}

step_train() {
  local work=/tmp/train budget=${STEP_BUDGET:-400} accelerator=${GPU_CHECK_TRAIN_ACCELERATOR:-gpu}
  local backend=${GPU_CHECK_TRAIN_BACKEND:-gsplat} width=${GPU_CHECK_TRAIN_WIDTH:-800}
  local steps=${GPU_CHECK_TRAIN_STEPS:-2000} fit_s max_time ckpt every
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  fit_s=$((budget - 90))  # the rest: start-up, the test command, and the table
  ((fit_s > 30)) || { echo "only ${budget}s left: no training run" >&2; return 1; }
  every=$((steps < 100 ? steps : 100))  # a checkpoint at most 100 steps before a stop by time
  max_time=$(printf '00:00:%02d:%02d' $((fit_s / 60)) $((fit_s % 60)))
  local common=(-c gaussian/blender --data.path "$DATA" --data.init_args.image_width "$width"
    --trainer.accelerator "$accelerator" --model.init_args.backend "$backend"
    "--trainer.callbacks+={\"class_path\": \"lightning_grendel.RunSummary\", \"init_args\": {\"path\": \"$work/summary.json\"}}")
  "$PY" -m lightning_grendel fit "${common[@]}" --trainer.max_steps "$steps" --trainer.max_time "$max_time" \
    "--trainer.callbacks+={\"class_path\": \"lightning.pytorch.callbacks.ModelCheckpoint\", \"init_args\": {\"dirpath\": \"$work/ckpt\", \"filename\": \"step{step:05d}\", \"every_n_train_steps\": $every, \"save_top_k\": -1}}"
  ckpt=$(find "$work/ckpt" -name 'step*.ckpt' | sort | tail -1)
  [[ -n $ckpt ]] || { echo "fit wrote no checkpoint" >&2; return 1; }
  "$PY" -m lightning_grendel test "${common[@]}" --ckpt_path "$ckpt"
  "$PY" - "$work/summary.json" "$steps" "$ckpt" "$STATE" <<'EOF'
import json
import sys
from pathlib import Path

summary, target, ckpt, state = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = summary["images_seen"]  # blender.yaml: one view per step
lines = [f"gpu.train_steps={steps}", f"gpu.train_fit_s={summary['fit_seconds']:.1f}",
         f"gpu.train_steps_per_s={steps / summary['fit_seconds']:.2f}", f"gpu.train_gaussians={summary['gaussians']}",
         f"gpu.train_test_psnr={summary['test']['test/psnr']:.2f}", f"gpu.train_test_ssim={summary['test']['test/ssim']:.4f}"]
with open(f"{state}/results.txt", "a") as results:
    for line in lines:
        print(f"RESULT {line}")
        results.write(f"RESULT {line}\n")
if steps < target:
    with open(f"{state}/note_train", "a") as note:
        note.write(f"stopped by the time limit at {steps} of {target} steps; tested {Path(ckpt).name}\n")
EOF
}

write_table() {
  local table=$OUT/results.md
  {
    echo "# benchmarks/gpu_check.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), total $((SECONDS - START)) s"
    echo
    echo "| step | status | seconds | notes |"
    echo "|---|---|---|---|"
    for name in "${STEPS[@]}"; do
      [[ -f $STATE/status_$name ]] || continue
      echo "| $name | $(cat "$STATE/status_$name") | $(cat "$STATE/seconds_$name") | $(paste -sd ';' "$STATE/note_$name" 2>/dev/null || true) |"
    done
    echo
    echo '```'
    cat "$STATE/results.txt" 2>/dev/null || true
    echo '```'
  } >"$table.tmp" && mv "$table.tmp" "$table"
  for log in "$STATE"/logs/*.log; do echo "===== $(basename "$log")"; cat "$log"; done >"$OUT/logs.txt" 2>/dev/null || true
  cat "$table"
}

run_step() {  # run_step NAME CAP_S RESERVE_S: at most CAP_S, leaving RESERVE_S for the steps after it
  local name=$1 cap=$2 reserve=$3 index=$4 left limit rc began
  left=$((START + BUDGET_S - SECONDS - reserve))
  limit=$((cap < left ? cap : left))
  local log=$STATE/logs/${index}_${name}.log
  if ((limit < 15)); then
    echo "SKIPPED (no time left)" >"$STATE/status_$name"; echo 0 >"$STATE/seconds_$name"; FAILED+=("$name"); return
  fi
  echo "== $name (limit ${limit}s) -> $log"
  began=$SECONDS
  if STEP_BUDGET=$limit timeout -k 10 "$limit" bash "${BASH_SOURCE[0]}" --step "$name" >"$log" 2>&1; then rc=0; else rc=$?; fi
  echo $((SECONDS - began)) >"$STATE/seconds_$name"
  case $rc in
    0) echo PASS >"$STATE/status_$name" ;;
    124 | 137) echo "TIMEOUT (${limit}s)" >"$STATE/status_$name"; FAILED+=("$name") ;;
    *) echo "FAIL (exit $rc)" >"$STATE/status_$name"; FAILED+=("$name") ;;
  esac
  echo "   $(cat "$STATE/status_$name") in $(cat "$STATE/seconds_$name") s"
  if ((rc != 0)); then echo "   --- last lines of $log ---"; tail -n 25 "$log" | sed 's/^/   /'; fi
}

if [[ ${1:-} == --step ]]; then
  STEP=$2
  common_env
  "step_$STEP"
  exit
fi

START=$SECONDS
FAILED=()
rm -rf "$STATE" && mkdir -p "$STATE/logs" "$OUT"
trap write_table EXIT
only=" ${GPU_CHECK_ONLY:-${STEPS[*]}} "
#        name     cap reserve
plan=("env     30  460" "install 90  420" "build   300 180" "pytest  180 120"
      "bench   120 90" "grendel 60  60" "train   420 5")
index=1
for entry in "${plan[@]}"; do
  read -r name cap reserve <<<"$entry"
  if [[ $only == *" $name "* ]]; then run_step "$name" "$cap" "$reserve" "$index"; fi
  index=$((index + 1))
done
trap - EXIT
write_table
if ((${#FAILED[@]})); then
  echo "FAILED steps: ${FAILED[*]}" | tee -a "$OUT/results.md"
  exit 1
fi
echo "all steps passed"
