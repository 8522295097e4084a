#!/usr/bin/env bash
# The prepared GPU run (issue 5): build with CUDA, run the test suite (CUDA tests
# included), the inat2018-preset correction with the paper's iNaturalist settings (as
# the CPU run in RESULTS.md), the GPU op
# benchmarks (with the card's measured bandwidth and matmul rate) and the fit
# benchmark and a per-kernel profile, then print a table last. Logs go to $OUT
# (default ./device_out; eight files, the most the device tool returns).
# Every step's timeout is cut to what is left of BUDGET seconds (default 330), so
# the whole run fits a 15-minute GPU slot with room for the machine's start; the
# CPU-only tests (which CI runs anyway) come last, in whatever time is left.
# A shorter rerun after a kernel change: OPS (bench_ops.py's --ops, default all),
# SIZES (default medium,large,huge), FIT_SIZES (bench_fit.py's --sizes, default
# imagenet-lt-2048; inat2018 adds the iNaturalist-sized fit), CASES
# (profile_kernels.py's --cases, default all those below), NCU=0 (no Nsight
# Compute counters) and CPU_TESTS=0 (skip the CPU-only tests).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
BUDGET="${BUDGET:-330}" SIZES="${SIZES:-medium,large,huge}" CPU_TESTS="${CPU_TESTS:-1}"
mkdir -p "$OUT"
# images that ship only python3
if ! command -v python >/dev/null; then mkdir -p /tmp/pybin; ln -sf "$(command -v python3)" /tmp/pybin/python; export PATH="/tmp/pybin:$PATH"; fi
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" ALPHANET_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for benchmarks/*.py too
# The GPU image's default compiler (/opt/gcc, a wrapper around g++ 13.3) built an
# extension whose first C++ error (any TORCH_CHECK) crashed inside c10::str with a
# segfault; the system g++ 13.3 builds one that raises. Prefer the system compiler.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
step() { echo "== $1 ($(date +%T), ${SECONDS}s in)" | tee -a "$OUT/summary.log"; }
# seconds for the next step: what it asks for, or what is left of the budget
limit() { local left=$((BUDGET - SECONDS)); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }
# peak RSS too where GNU time exists (it may not on a bare image)
timed() { if [ -x /usr/bin/time ]; then /usr/bin/time -v "$@"; else "$@"; fi; }

step "build"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/summary.log"
timeout "$(limit 240)" python setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python -c "import alphanet_ext.ops as o; o.check_registered('CUDA'); print('CUDA kernels registered')" | tee -a "$OUT/summary.log"
# a C++ error must reach Python as an exception (see the compiler note above)
python -c "
import torch, alphanet_ext
try:
    torch.ops.alphanet.class_means(torch.ones(2, 2, device='cuda'), torch.tensor([0, 5], device='cuda'), 2)
except RuntimeError as error:
    print('C++ errors raise:', str(error).splitlines()[0])" 2>&1 | tee -a "$OUT/summary.log"

step "tests"
# the CUDA tests first, so a failure elsewhere cannot hide them; no -x: every failure is listed
timeout "$(limit 100)" python -m pytest python_tests -q -p no:cacheprovider -k cuda 2>&1 | tee "$OUT/tests_cuda.log" | tail -15

step "inat2018 preset, end to end (the paper's iNaturalist settings: 10 epochs, batch 256; rho 1)"
timeout "$(limit 90)" python -m alphanet_ext synth --preset inat2018 --out /tmp/inat > "$OUT/inat.log" 2>&1
begin=$SECONDS
timed timeout "$(limit 180)" python -m alphanet_ext fit --train /tmp/inat/train_x.npy --val /tmp/inat/val_x.npy \
  --test /tmp/inat/test_x.npy --classifier /tmp/inat/classifier.pt --out /tmp/inat/corrected.pt \
  --epochs 10 --batch-size 256 --rho 1 --device cuda --report /tmp/inat/report >> "$OUT/inat.log" 2>&1
echo "inat2018 fit: exit $?, $((SECONDS - begin)) s wall (whole command: load, means, neighbours, fit, test, report)" \
  | tee -a "$OUT/inat.log"
python -c "import json; print('inat2018 fit stages (s):', json.load(open('/tmp/inat/report/report.json'))['runs'][0]['timings'])" \
  2>&1 | tee -a "$OUT/inat.log"

step "op benchmarks"
timeout "$(limit 150)" python benchmarks/bench_ops.py --device cuda --sizes "$SIZES" ${OPS:+--ops "$OPS"} --repeats 5 2>&1 \
  | tee "$OUT/bench_ops.log"

step "fit benchmark (training steps replayed as CUDA graphs, and launched one by one)"
timeout "$(limit 90)" python benchmarks/bench_fit.py --device cuda --sizes "${FIT_SIZES:-imagenet-lt-2048}" \
  --peer-epochs 0 --graphs both 2>&1 | tee "$OUT/bench_fit.log"

step "kernel profile"
CASES="${CASES:-class-means-large,knn-large,knn-large-matmul,knn-huge,combine-rows-large,combine-columns-large,fit-epoch}"
timeout "$(limit 75)" python benchmarks/profile_kernels.py --fit-data /tmp/inat --cases "$CASES" 2>&1 \
  | tee "$OUT/profile.log"
# hardware counters of our kernels where ncu can read them (Firecracker machines, not gVisor)
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  timeout "$(limit 75)" ncu --clock-control none --launch-count 16 --section SpeedOfLight --section Occupancy \
    --kernel-name regex:"class_sums|alpha_partials|alphas_from_partials|column_plan|forward_staged|forward_packed|grad_alphas" \
    python benchmarks/profile_kernels.py --plain --cases class-means-large,combine-rows-large,combine-columns-large \
    >> "$OUT/profile.log" 2>&1
fi

step "CPU-only tests"
if [ "$CPU_TESTS" = 1 ]; then
  timeout "$(limit 80)" python -m pytest python_tests -q -p no:cacheprovider -k "not cuda" 2>&1 | tee "$OUT/tests.log" | tail -5
else
  echo "skipped (CPU_TESTS=0)" | tee "$OUT/tests.log"
fi

step "table"
head -2 "$OUT/summary.log"; tail -1 "$OUT/tests_cuda.log"; tail -1 "$OUT/tests.log"
grep -E "^\| |^card|^\(int8 screening|^\(training step" "$OUT/bench_ops.log" "$OUT/bench_fit.log" | sed 's/^[^:]*://'
grep -E "inat2018 fit|Elapsed|Maximum resident|^\| (baseline|AlphaNet)" "$OUT/inat.log"
