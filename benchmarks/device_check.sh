#!/usr/bin/env bash
# The prepared GPU run (issue 5): build with CUDA, run the test suite (CUDA tests
# included), measure the card, run the GPU benchmarks and an inat2018-preset
# correction, and print a table last. Logs go to $OUT (default ./device_out).
# Budget: under 8 minutes on an H100/H200 with 16 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" ALPHANET_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.log"; }

step "build"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 240 python setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python -c "import alphanet_ext.ops as o; o.check_registered('CUDA'); print('CUDA kernels registered')" | tee -a "$OUT/summary.log"

step "tests"
timeout 180 python -m pytest python_tests -q -x 2>&1 | tee "$OUT/tests.log" | tail -3

step "op benchmarks"
timeout 150 python benchmarks/bench_ops.py --device cuda --sizes medium,large,huge --repeats 5 2>&1 | tee "$OUT/bench_ops.log"

step "fit benchmark"
timeout 90 python benchmarks/bench_fit.py --device cuda --sizes imagenet-lt-2048 --peer-epochs 0 2>&1 | tee "$OUT/bench_fit.log"

step "inat2018 preset, end to end"
timeout 120 python -m alphanet_ext synth --preset inat2018 --out /tmp/inat > "$OUT/inat.log" 2>&1
/usr/bin/time -v timeout 150 python -m alphanet_ext fit --train /tmp/inat/train_x.npy --val /tmp/inat/val_x.npy \
  --test /tmp/inat/test_x.npy --classifier /tmp/inat/classifier.pt --out /tmp/inat/corrected.pt --epochs 10 \
  --batch-size 256 --rho 1 --device cuda --quiet >> "$OUT/inat.log" 2>&1
grep -E "Elapsed|Maximum resident" "$OUT/inat.log"

step "table"
cat "$OUT/gpu.txt"; tail -1 "$OUT/tests.log"
grep -E "^\| |^card" "$OUT/bench_ops.log" "$OUT/bench_fit.log" | sed 's/^[^:]*://'
grep -E "Elapsed|Maximum resident" "$OUT/inat.log"
