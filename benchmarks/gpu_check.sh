#!/usr/bin/env bash
# The one prepared GPU check: build, test the CUDA/Triton kernels against the reference,
# benchmark them against a device-to-device copy, and leave the results under OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Meant for a fresh, offline GPU machine that already has python3 with torch, triton, nvcc,
# cmake, ninja, pybind11, scikit-build-core, pytest and rich (the lent H100/H200 image has
# them). Finishes inside GPU_CHECK_TOTAL (560) seconds. For a dry run on a CPU machine:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=quick bash benchmarks/gpu_check.sh /tmp/out
# The image has no UCX: `make gpu-wheels` downloads the libucx-cu13 wheel (43 MB) into wheels/
# (git-ignored) and records the commit in wheels/GIT_SHA; carry that folder along and the
# transfer layer is built and tested with GPU pools too. Without it those steps say why they
# did not run.
#
# What comes back: the device tool returns at most 8 files from OUTDIR, so every log, table and
# JSON file is written to a scratch folder and packed into OUTDIR/gpu_check.tgz after every
# step (a run cut short still returns what it had); OUTDIR also gets bench.jsonl, targets.json
# and summary.txt as plain files.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PRESET=${GPU_CHECK_PRESET:-large}
W=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$PATH:/usr/local/cuda/bin"  # CMake finds nvcc on PATH only
if [ -z "${THUNDERKV_GIT_SHA:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1 \
    && [ -f wheels/GIT_SHA ]; then
  export THUNDERKV_GIT_SHA=$(cat wheels/GIT_SHA)  # the tree travels without .git
fi
exec > >(tee -a "$W/console.log") 2>&1
failed=()
skipped=()
save() {  # pack the scratch folder into OUTDIR (refreshed after every step)
  tar czf "$W.tgz" -C "$W" . 2>/dev/null && mv -f "$W.tgz" "$OUT/gpu_check.tgz"
  for f in bench.jsonl targets.json summary.txt; do
    [ -f "$W/$f" ] && cp -f "$W/$f" "$OUT/$f"
  done
  return 0
}
trap save EXIT
step() { save; echo "== $(date +%T) +${SECONDS}s $*"; }
limit() { timeout -k 10 "$@"; }
# Each step gets its own time limit, so a kernel that hangs (a bad shuffle mask, say) costs one
# step, not the whole device lease. The device call is capped at 600 s; the steps share TOTAL.
TOTAL=${GPU_CHECK_TOTAL:-560}
budget() {  # budget LIMIT RESERVE: LIMIT cut so RESERVE seconds stay for later steps;
  # prints nothing and fails when under 20 s would be left for this one
  local c=$(( TOTAL - SECONDS - $2 ))
  [ "$c" -gt "$1" ] && c=$1
  [ "$c" -ge 20 ] && echo "$c"
}
PYTEST_TIMEOUT=()
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=90)

step "device and tools"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    || echo "no nvidia-smi"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo none)"
  echo "cmake: $(cmake --version 2>/dev/null | head -1 || echo none)"
  $PY - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "scikit_build_core", "pybind11", "pytest"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - report, do not stop
        print(m, "missing:", exc)
PYEOF
  echo "commit: ${THUNDERKV_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
} | tee "$W/device.txt"

step "UCX for the transfer layer"
if $PY -c "import libucx" 2>/dev/null; then
  echo "libucx already installed"
elif ls wheels/libucx*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps wheels/libucx*.whl >"$W/libucx.log" 2>&1 \
    && echo "installed $(ls wheels/libucx*.whl)" || { tail -5 "$W/libucx.log"; failed+=(libucx); }
else
  echo "no libucx and no wheels/libucx*.whl: the transfer layer builds without UCX"
fi

step "build (pip install -e .; CUDA required on a CUDA run)"
# -v: pip shows CMake's configure lines (which parts were built and why not)
build() {
  local t
  t=$(budget 300 240) || return 1
  echo "-- pip install $*" >>"$W/build.log"
  limit "$t" $PY -m pip install -v --no-build-isolation --no-deps -e . "$@" >>"$W/build.log" 2>&1
}
cuda_flag=()
[ "$DEVICE" = cuda ] && cuda_flag=(-C cmake.define.THUNDERKV_CUDA=ON)
if ! build "${cuda_flag[@]}"; then
  tail -40 "$W/build.log"
  # The kernels matter most: if UCX broke the build, build without it; if CUDA did, build
  # without both, so the Triton kernels (no nvcc needed) are still tested and benchmarked.
  if $PY -c "import libucx" 2>/dev/null && build "${cuda_flag[@]}" -C cmake.define.THUNDERKV_UCX=OFF; then
    echo "BUILD FAILED with UCX; built without it"
    failed+=(ucx-build)
  elif [ "$DEVICE" = cuda ] && build -C cmake.define.THUNDERKV_CUDA=OFF -C cmake.define.THUNDERKV_UCX=OFF; then
    echo "CUDA BUILD FAILED; built without CUDA and UCX (Triton only)"
    failed+=(cuda-build)
  else
    echo "BUILD FAILED"
    failed+=(build)
    exit 1
  fi
fi
grep -E -- "-- ThunderKV" "$W/build.log" | sort -u | head -12 || true
$PY -m thunderkv.cli env --json >"$W/env.json" || failed+=(env)
$PY - "$W/env.json" "$DEVICE" <<'PYEOF' || failed+=(backends-unavailable)
import json, sys
info = json.load(open(sys.argv[1]))
for name, st in info["backends"].items():
    print(f"backend {name:9s} {'yes' if st['available'] else 'no: ' + str(st['why_not'])}")
# On a GPU machine the GPU backends must load: otherwise their tests would only skip and the
# check would look green (say, a driver older than the CUDA runtime the extension links).
missing = [n for n in ("cuda", "triton") if sys.argv[2] == "cuda"
           and not info["backends"].get(n, {}).get("available")]
if missing:
    sys.exit(f"GPU backend(s) unavailable on this GPU machine: {missing}")
PYEOF

step "kernel tests against the reference (one process per file)"
# One pytest per file: a CUDA fault poisons its process's context, not the later files'.
# GPU tests only (CI runs the CPU ones); the Triton file's bit-exact test runs on the GPU here.
RESERVE=220  # seconds kept for the steps after the current phase (set per phase)
run_tests() {  # run_tests NAME FILE [pytest args...]
  local name=$1 file=$2 t
  shift 2
  [ -f "$file" ] || return 0
  if ! t=$(budget 150 "$RESERVE"); then
    echo "$name: skipped for time"
    skipped+=("tests-$name")
    return 0
  fi
  limit "$t" $PY -m pytest -q -rs -p no:cacheprovider "${PYTEST_TIMEOUT[@]}" "$file" "$@" \
    --junitxml="$W/tests_$name.xml" >"$W/tests_$name.log" 2>&1
  local rc=$?
  echo "$name: $(tail -1 "$W/tests_$name.log")"
  case $rc in
    0|5) ;;  # 5: nothing selected
    124|137) echo "$name: ran out of its $t s"; failed+=("tests-$name-timeout") ;;
    *) grep -E "^(FAILED|ERROR)" "$W/tests_$name.log" | head -10; failed+=("tests-$name") ;;
  esac
}
run_tests cuda tests/test_cuda_backend.py
run_tests triton tests/test_triton_backend.py -k "not compile_for_gpu"
run_tests attention_triton tests/test_attention_triton.py  # the HF hook's fused decode on GPU
run_tests paged tests/test_paged.py -m gpu
run_tests checksum tests/transfer/test_checksum.py -m gpu

step "benchmark: quantize/dequantize vs device copy ($DEVICE, preset $PRESET)"
RESERVE=150  # memcheck and the transfer steps
backend_args=()
for b in cuda triton cpu; do
  $PY -c "import sys, torch; from thunderkv import backends; \
sys.exit(backends.unavailable_reason('$b', torch.device('$DEVICE')) is not None)" 2>/dev/null \
    && backend_args+=(--backend "$b")
done
bench() {  # bench NAME CMD...: one benchmark process with its own time limit
  local name=$1 t
  shift
  if ! t=$(budget 90 "$RESERVE"); then
    echo "$name: skipped for time"
    skipped+=("$name")
    return 0
  fi
  limit "$t" "$@" >"$W/$name.txt" 2>&1 || { tail -20 "$W/$name.txt"; failed+=("$name"); }
}
if [ ${#backend_args[@]} -eq 0 ]; then
  echo "no compiled backend usable on $DEVICE"
  failed+=(bench)
else
  Q=($PY -m thunderkv.cli bench quant --device "$DEVICE" --preset "$PRESET" --reps 20
     --json "$W/bench.jsonl")
  for dtype in float16 bfloat16; do
    bench "bench_quant_$dtype" "${Q[@]}" --dtype "$dtype" "${backend_args[@]}"
  done
  # per-channel (KIVI keys): strided reads, no transposed copy
  bench bench_quant_float16_axis-2 "${Q[@]}" --dtype float16 --axis -2 "${backend_args[@]}"
  # A/B/C in the same run, per-channel CUDA: the register-resident quantize
  # (THUNDERKV_CUDA_COLS=regs) and the one-thread-per-group kernels (THUNDERKV_CUDA_SCALAR=1)
  # against the default two-pass vector kernels above; rows carry the variable in env.
  if [[ " ${backend_args[*]} " == *" cuda "* ]]; then
    bench bench_quant_float16_axis-2_regs env THUNDERKV_CUDA_COLS=regs "${Q[@]}" \
      --dtype float16 --axis -2 --backend cuda
    bench bench_quant_float16_axis-2_scalar env THUNDERKV_CUDA_SCALAR=1 "${Q[@]}" \
      --dtype float16 --axis -2 --backend cuda
  fi
  bench bench_paged $PY -m thunderkv.cli bench paged --device "$DEVICE" --preset "$PRESET" \
    --reps 20 "${backend_args[@]}" --json "$W/bench.jsonl"
  bench bench_crc $PY benchmarks/crc_bench.py --device "$DEVICE" --json "$W/bench.jsonl"
fi
# fused decode attention over a 4-bit KIVI cache (Triton on a GPU) vs SDPA over fp16 K/V and
# dequantize+SDPA, one Llama-3-8B layer, same run
if [ "$PRESET" = quick ]; then ATT_CTX=(--context 1024); else ATT_CTX=(--context 4096 --context 32768); fi
bench bench_attention $PY -m thunderkv.cli bench attention --device "$DEVICE" --geometry llama3-8b \
  --dtype float16 "${ATT_CTX[@]}" --reps 20 --json "$W/bench_attention.jsonl"

step "compute-sanitizer memcheck: CUDA kernels on awkward shapes and paged rows"
# float16 only (dtype0) for the per-channel shapes, with and without THUNDERKV_CUDA_COLS=regs:
# memcheck is slow, and the CPU emulation under AddressSanitizer already covers every dtype.
# Out-of-bounds reads or writes that happen not to change the compared bits pass the tests;
# memcheck sees them. Torch's caching allocator would hide overruns inside its pool, so it is
# off here. Before the transfer steps: it is the only check of its kind.
SANITIZER=$(command -v compute-sanitizer || true)
if [ "$DEVICE" != cuda ] || [ -z "$SANITIZER" ]; then
  echo "skipped: $([ "$DEVICE" != cuda ] && echo "not a CUDA run" || echo "no compute-sanitizer")"
elif ! t=$(budget 100 60); then
  echo "skipped for time"
  skipped+=(memcheck)
else
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 limit "$t" "$SANITIZER" --tool memcheck \
    --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda_backend.py::test_cuda_per_channel_reads_strided_on_awkward_shapes \
    tests/test_paged.py::test_paged_ops_on_gpu_match_the_cpu_cache \
    -k "dtype0 or (paged_ops and not triton)" \
    >"$W/memcheck.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$W/memcheck.log" | tail -3
  if grep -qiE "device not supported|error 999|unable to (initialize|attach)" "$W/memcheck.log"; then
    echo "memcheck unavailable on this machine (no finding, no verdict)"
    skipped+=(memcheck-unavailable)
  else
    case $rc in
      0) ;;
      124|137) echo "memcheck ran out of time: no finding, and no verdict either"
               skipped+=(memcheck-timeout) ;;
      *) tail -30 "$W/memcheck.log"; failed+=(memcheck) ;;
    esac
  fi
fi

step "transfer with GPU pools (two processes over loopback)"
ucx_why=$($PY -c "from thunderkv.transfer import unavailable_reason as u; print(u() or 'none')" \
  2>>"$W/ucx_check.log" | tail -1)
if [ "$ucx_why" != "none" ]; then
  echo "transfer layer unavailable: ${ucx_why:-the check failed, see ucx_check.log}"
  ls wheels/libucx*.whl >/dev/null 2>&1 && failed+=(transfer-unavailable)
else
  RESERVE=25
  run_tests transfer_gpu tests/transfer/test_transfer_gpu.py
  RESERVE=0
  bench bench_transfer $PY -m thunderkv.cli bench transfer --device "$DEVICE" --quick \
    --perftest-runs 1 --json "$W/bench_transfer.jsonl"
fi

step "summary"
[ -f "$W/bench.jsonl" ] && $PY - "$W/bench.jsonl" >"$W/summary.txt" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'bench':6s} {'case':24s} {'dtype':9s} {'axis':>4s} {'op':11s} {'backend':14s} "
      f"{'GB/s':>9s} {'x copy':>7s} {'graph GB/s':>10s} {'x copy':>7s}")
for r in rows:
    env = r.get("env") or {}
    backend = r["backend"] + ("/scalar" if env.get("THUNDERKV_CUDA_SCALAR") else
                              "/" + env["THUNDERKV_CUDA_COLS"] if env.get("THUNDERKV_CUDA_COLS") else "")
    gb, gr = r.get("graph_gbps"), r.get("graph_ratio_to_copy")
    graph = (f"{'-' if gb is None else f'{gb:.1f}':>10s} "
             f"{'-' if gr is None else f'{gr:.2f}':>7s}")
    print(f"{r['bench']:6s} {r['label'][:24]:24s} {r['dtype']:9s} {r.get('axis', -1):4d} "
          f"{r['op'][:11]:11s} {backend:14s} {r['gbps']:9.1f} {r['ratio_to_copy']:7.2f} {graph}")
PYEOF
[ -f "$W/bench.jsonl" ] && { $PY benchmarks/gpu_targets.py "$W/bench.jsonl" --json "$W/targets.json" \
  >>"$W/summary.txt" || failed+=(targets-script); }
[ -f "$W/bench_transfer.jsonl" ] && $PY - "$W/bench_transfer.jsonl" >>"$W/summary.txt" <<'PYEOF'
import json, sys
print(f"{'transfer':8s} {'case':20s} {'bits':>4s} {'memory':7s} {'transport':22s} {'wire GB/s':>9s} "
      f"{'vs raw':>6s} {'e2e/perftest':>12s}")
for r in map(json.loads, open(sys.argv[1])):
    ratio = r.get("e2e_vs_perftest")
    print(f"{'':8s} {r['model'] + ':' + str(r['tokens']):20s} {r['bits']:4d} "
          f"{r.get('memory_type', '?'):7s} {r['transport'][:22]:22s} "
          f"{r['wire_bytes_per_s'] / 1e9:9.2f} {r.get('speedup_vs_raw', 1):6.2f} "
          f"{'-' if ratio is None else f'{ratio:.2f}':>12s}")
PYEOF
[ -f "$W/bench_attention.jsonl" ] && $PY - "$W/bench_attention.jsonl" >>"$W/summary.txt" <<'PYEOF'
import json, sys
print(f"{'attention':9s} {'geometry':12s} {'context':>7s} {'method':13s} {'p50 us':>9s} {'x sdpa-fp':>9s}")
for r in map(json.loads, open(sys.argv[1])):
    print(f"{'':9s} {r['geometry']:12s} {r['context']:7d} {r['method']:13s} {r['us_p50']:9.1f} "
          f"{r['speedup_vs_sdpa_fp']:9.2f}")
PYEOF
# The tool returns only the output's last 12,000 characters: print the verdicts, not the table
# (summary.txt has everything).
if [ -f "$W/summary.txt" ]; then
  echo "$(grep -c '' "$W/summary.txt") lines in summary.txt; the target verdicts:"
  grep -E "^targets:|MISS" "$W/summary.txt" | head -40
  awk '/^transfer/ {p = 1} /^attention/ {p = 0} p' "$W/summary.txt"
  awk '/^attention/ {p = 1} p' "$W/summary.txt"
fi
[ ${#skipped[@]} -gt 0 ] && echo "skipped: ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK OK"
