#!/usr/bin/env bash
# The one prepared GPU check: build, test the CUDA/Triton kernels against the reference,
# benchmark them against a device-to-device copy, and leave everything under OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Meant for a fresh, offline GPU machine that already has python3 with torch, triton, nvcc,
# cmake, ninja, pybind11, scikit-build-core, pytest and rich (the lent H100/H200 image has
# them). Finishes in a few minutes. For a dry run on a CPU machine:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=quick bash benchmarks/gpu_check.sh /tmp/out
# The image has no UCX: `make gpu-wheels` downloads the libucx-cu13 wheel (43 MB) into wheels/
# (git-ignored); carry that folder along and the transfer layer is built and tested with GPU
# pools too. Without it those steps say why they did not run.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PRESET=${GPU_CHECK_PRESET:-large}
export PYTHONUNBUFFERED=1
failed=()
step() { echo "== $(date +%T) $*"; }
# Each step gets its own time limit, so a kernel that hangs (a bad shuffle mask, say) costs one
# step, not the whole device lease: the later steps still run and the summary still prints.
TESTS_LIMIT=${GPU_CHECK_TESTS_LIMIT:-240}
BENCH_LIMIT=${GPU_CHECK_BENCH_LIMIT:-90}
limit() { timeout -k 10 "$@"; }
# The device call is capped at 600 s: the steps after the kernel benchmarks get only what is
# left of this many seconds (each limit cut to fit, a step skipped when too little is left).
TOTAL=${GPU_CHECK_TOTAL:-560}
left() { echo $((TOTAL - SECONDS)); }
cap() {  # cap LIMIT RESERVE: LIMIT, cut so that RESERVE seconds stay for the rest (>= 1)
  local c=$(( $(left) - $2 )); [ "$c" -gt "$1" ] && c=$1; [ "$c" -lt 1 ] && c=1; echo "$c"
}
rm -f "$OUT/bench.jsonl" "$OUT/bench_transfer.jsonl"  # fresh rows, even in a reused OUTDIR

step "device"
(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  || echo "no nvidia-smi") | tee "$OUT/device.txt"

step "UCX for the transfer layer"
if $PY -c "import libucx" 2>/dev/null; then
  echo "libucx already installed"
elif ls wheels/libucx*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index wheels/libucx*.whl >"$OUT/libucx.log" 2>&1 \
    && echo "installed $(ls wheels/libucx*.whl)" || { tail -5 "$OUT/libucx.log"; failed+=(libucx); }
else
  echo "no libucx and no wheels/libucx*.whl: the transfer layer builds without UCX"
fi

step "build (pip install -e ., CUDA on when nvcc is present)"
build() { $PY -m pip install --no-build-isolation --no-deps -e . "$@" >>"$OUT/build.log" 2>&1; }
if ! build; then
  tail -40 "$OUT/build.log"
  # The kernels matter most: if the UCX module (built because libucx is there) broke the
  # build, build without it and report that, rather than lose the whole check.
  if $PY -c "import libucx" 2>/dev/null && build -C cmake.define.THUNDERKV_UCX=OFF; then
    echo "BUILD FAILED with UCX; built without it"
    failed+=(ucx-build)
  else
    echo "BUILD FAILED"
    exit 1
  fi
fi
grep -E "ThunderKV|CUDA" "$OUT/build.log" | head -10 || true
$PY -m thunderkv.cli env --json >"$OUT/env.json" || failed+=(env)
$PY - "$OUT/env.json" "$DEVICE" <<'PYEOF' || failed+=(backends-unavailable)
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

step "kernel tests against the reference"
tests=(tests/test_cuda_backend.py)
for t in tests/test_triton_backend.py tests/test_paged.py tests/transfer/test_checksum.py; do
  [ -f "$t" ] && tests+=("$t")
done
limit "$(cap "$TESTS_LIMIT" 60)" $PY -m pytest -q -rs "${tests[@]}" --junitxml="$OUT/tests.xml" 2>&1 \
  | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(tests)

step "benchmark: quantize/dequantize vs device copy ($DEVICE, preset $PRESET)"
backend_args=()
for b in cuda triton cpu; do
  $PY -c "import sys, torch; from thunderkv import backends; \
sys.exit(backends.unavailable_reason('$b', torch.device('$DEVICE')) is not None)" 2>/dev/null \
    && backend_args+=(--backend "$b")
done
if [ ${#backend_args[@]} -eq 0 ]; then
  echo "no compiled backend usable on $DEVICE"
  failed+=(bench)
else
  for dtype in float16 bfloat16; do
    limit "$(cap "$BENCH_LIMIT" 20)" $PY -m thunderkv.cli bench quant --device "$DEVICE" --preset "$PRESET" --dtype "$dtype" \
      --reps 20 "${backend_args[@]}" --json "$OUT/bench.jsonl" >"$OUT/bench_quant_$dtype.txt" 2>&1 \
      || { cat "$OUT/bench_quant_$dtype.txt"; failed+=("bench-quant-$dtype"); }
  done
  # per-channel (KIVI keys): strided reads, no transposed copy
  limit "$(cap "$BENCH_LIMIT" 20)" $PY -m thunderkv.cli bench quant --device "$DEVICE" --preset "$PRESET" --dtype float16 \
    --axis -2 --reps 20 "${backend_args[@]}" --json "$OUT/bench.jsonl" \
    >"$OUT/bench_quant_float16_axis-2.txt" 2>&1 \
    || { cat "$OUT/bench_quant_float16_axis-2.txt"; failed+=("bench-quant-axis-2"); }
  # A/B/C in the same run, per-channel CUDA: the register-resident quantize
  # (THUNDERKV_CUDA_COLS=regs) and the one-thread-per-group kernels (THUNDERKV_CUDA_SCALAR=1)
  # against the default two-pass vector kernels above; rows carry the variable in env.
  if [[ " ${backend_args[*]} " == *" cuda "* ]]; then
    for variant in regs:THUNDERKV_CUDA_COLS=regs scalar:THUNDERKV_CUDA_SCALAR=1; do
      txt="$OUT/bench_quant_float16_axis-2_${variant%%:*}.txt"
      env "${variant#*:}" timeout -k 10 "$(cap "$BENCH_LIMIT" 20)" $PY -m thunderkv.cli bench quant \
        --device "$DEVICE" --preset "$PRESET" --dtype float16 --axis -2 --reps 20 --backend cuda \
        --json "$OUT/bench.jsonl" >"$txt" 2>&1 || { cat "$txt"; failed+=("bench-quant-axis-2-${variant%%:*}"); }
    done
  fi
  limit "$(cap "$BENCH_LIMIT" 20)" $PY -m thunderkv.cli bench paged --device "$DEVICE" --preset "$PRESET" --reps 20 \
    "${backend_args[@]}" --json "$OUT/bench.jsonl" >"$OUT/bench_paged.txt" 2>&1 \
    || { cat "$OUT/bench_paged.txt"; failed+=(bench-paged); }
  limit "$(cap "$BENCH_LIMIT" 20)" $PY benchmarks/crc_bench.py --device "$DEVICE" --json "$OUT/bench.jsonl" \
    >"$OUT/bench_crc.txt" 2>&1 || { cat "$OUT/bench_crc.txt"; failed+=(bench-crc); }
fi

step "transfer with GPU pools (two processes over loopback)"
ucx_why=$($PY -c "from thunderkv.transfer import unavailable_reason as u; print(u() or 'none')" \
  2>>"$OUT/ucx_check.log" | tail -1)
if [ "$ucx_why" != "none" ]; then
  echo "transfer layer unavailable: ${ucx_why:-the check failed, see ucx_check.log}"
  ls wheels/libucx*.whl >/dev/null 2>&1 && failed+=(transfer-unavailable)
elif [ "$(left)" -lt 90 ]; then
  echo "skipped: $SECONDS s used, $(left) s left of $TOTAL (GPU_CHECK_TOTAL)"
  failed+=(transfer-skipped-for-time)
else
  limit "$(cap "$TESTS_LIMIT" 60)" $PY -m pytest -q -rs \
    tests/transfer/test_transfer_gpu.py --junitxml="$OUT/tests_transfer.xml" 2>&1 \
    | tee "$OUT/tests_transfer.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(transfer-tests)
  if [ "$(left)" -lt 40 ]; then
    echo "bench transfer skipped: $(left) s left"
    failed+=(bench-transfer-skipped-for-time)
  else
    limit "$(cap "$BENCH_LIMIT" 20)" $PY -m thunderkv.cli bench transfer \
      --device "$DEVICE" --quick --perftest-runs 1 --json "$OUT/bench_transfer.jsonl" \
      >"$OUT/bench_transfer.txt" 2>&1 || { tail -20 "$OUT/bench_transfer.txt"; failed+=(bench-transfer); }
  fi
fi

step "compute-sanitizer memcheck: CUDA kernels on awkward shapes and paged rows"
# float16 only (dtype0) for the per-channel shapes, with and without THUNDERKV_CUDA_COLS=regs:
# memcheck is slow, and the CPU emulation under AddressSanitizer already covers every dtype.
# Out-of-bounds reads or writes that happen not to change the compared bits pass the tests;
# memcheck sees them. Torch's caching allocator would hide overruns inside its pool, so it is
# off here. Last and optional: it gets what time is left.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ "$DEVICE" != cuda ] || [ -z "$SANITIZER" ]; then
  echo "skipped: ${SANITIZER:+not a CUDA run}${SANITIZER:-no compute-sanitizer}"
elif [ "$(left)" -lt 100 ]; then
  echo "skipped: $(left) s left of $TOTAL"
else
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 limit "$(cap 150 15)" "$SANITIZER" --tool memcheck \
    --error-exitcode 3 $PY -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda_backend.py::test_cuda_per_channel_reads_strided_on_awkward_shapes \
    tests/test_paged.py::test_paged_ops_on_gpu_match_the_cpu_cache \
    -k "dtype0 or (paged_ops and not triton)" \
    >"$OUT/memcheck.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
  case $rc in
    0) ;;
    124|137) echo "memcheck ran out of time: no finding, and no verdict either" ;;
    *) tail -30 "$OUT/memcheck.log"; failed+=(memcheck) ;;
  esac
fi

step "summary"
$PY - "$OUT/bench.jsonl" <<'PYEOF'
import json, os, sys
path = sys.argv[1]
if not os.path.exists(path):
    sys.exit("no benchmark rows")
rows = [json.loads(l) for l in open(path)]
print(f"{'bench':6s} {'case':24s} {'dtype':9s} {'axis':>4s} {'op':11s} {'backend':9s} "
      f"{'GB/s':>9s} {'x copy':>7s} {'graph GB/s':>10s} {'x copy':>7s}")
for r in rows:
    env = r.get("env", {})
    backend = r["backend"] + ("/scalar" if env.get("THUNDERKV_CUDA_SCALAR") else
                              "/" + env["THUNDERKV_CUDA_COLS"] if env.get("THUNDERKV_CUDA_COLS") else "")
    gb, gr = r.get("graph_gbps"), r.get("graph_ratio_to_copy")
    graph = (f"{'-' if gb is None else f'{gb:.1f}':>10s} "
             f"{'-' if gr is None else f'{gr:.2f}':>7s}")
    print(f"{r['bench']:6s} {r['label']:24s} {r['dtype']:9s} {r.get('axis', -1):4d} {r['op']:11s} "
          f"{backend:9s} {r['gbps']:9.1f} {r['ratio_to_copy']:7.2f} {graph}")
PYEOF
[ -f "$OUT/bench.jsonl" ] && { $PY benchmarks/gpu_targets.py "$OUT/bench.jsonl" --json "$OUT/targets.json" || failed+=(targets-script); }
[ -f "$OUT/bench_transfer.jsonl" ] && $PY - "$OUT/bench_transfer.jsonl" <<'PYEOF'
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
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK OK"
