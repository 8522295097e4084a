#!/usr/bin/env bash
# The prepared GPU run: build with CUDA, then the steps named in STEPS (default: all,
# in this order), each cut to what is left of BUDGET seconds (default 330) so the run
# fits a 15-minute GPU slot with room for the machine's start:
#   inat        the inat2018-preset `alphanet fit` command, files to report (the paper's
#               iNaturalist settings), timed whole, then once more under cProfile
#               ($OUT/inat.prof: where the seconds outside the fit go)
#   one-rank    bench_one_rank.py: the row- and class-sharded fit on a one-rank NCCL
#               group against the plain fit at iNaturalist size
#   extract     bench_extract.py on the GPU: images/s against the model's forward rate
#   distributed bench_distributed.py --device cuda --ranks 1: the class-sharded step at
#               200,000 classes, for the cost model
#   crt         bench_crt.py on the GPU (cRT against a plain torch loop, imagenet-lt), then
#               bench_presets.py on inat2018 (compare --select against each method's test accuracy)
#   tests       the CUDA tests (the CPU-only ones, which CI runs anyway, are cpu-tests)
#   ops, fit, profile, cpu-tests   the kernel benchmarks, bench_fit.py, the kernel profile
# Options: OPS (bench_ops.py's --ops), SIZES (default medium,large,huge), FIT_SIZES
# (bench_fit.py's --sizes, default imagenet-lt-2048), CASES (profile_kernels.py's
# --cases), NCU=0 (no Nsight Compute counters). Logs go to $OUT (default ./device_out;
# eight files at most come back). The built module is copied to $OUT/_C.so; a later run
# given it in .prebuilt/ (carried) skips the build when the C++ sources did not change.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
BUDGET="${BUDGET:-330}" SIZES="${SIZES:-medium,large,huge}"
STEPS="${STEPS:-inat one-rank extract distributed crt tests ops fit profile cpu-tests}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT"
# images that ship only python3
if ! command -v python >/dev/null; then mkdir -p /tmp/pybin; ln -sf "$(command -v python3)" /tmp/pybin/python; export PATH="/tmp/pybin:$PATH"; fi
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" ALPHANET_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for benchmarks/*.py too
# The image's site-packages keep no compiled bytecode, so every process compiled torch's
# Python files again (1.8 s of each command); an installed package has its .pyc.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-/tmp/pycache}" MPLCONFIGDIR="${MPLCONFIGDIR:-/tmp/mplconfig}"
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
module=$(python -c "import sysconfig; print('alphanet_ext/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -f .prebuilt/_C.so ]; then
  cp .prebuilt/_C.so "$module" && echo "using the carried module (.prebuilt/_C.so)" | tee -a "$OUT/summary.log"
else
  timeout "$(limit 240)" python setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  echo "built in ${SECONDS}s" | tee -a "$OUT/summary.log"; tail -3 "$OUT/build.log" >> "$OUT/summary.log"; rm -f "$OUT/build.log"
  strip --strip-debug -o "$OUT/_C.so" "$module" 2>/dev/null || cp "$module" "$OUT/_C.so"
fi
python -c "import alphanet_ext.ops as o; o.check_registered('CUDA'); print('CUDA kernels registered')" | tee -a "$OUT/summary.log"
# a C++ error must reach Python as an exception (see the compiler note above)
python -c "
import torch, alphanet_ext
try:
    torch.ops.alphanet.class_means(torch.ones(2, 2, device='cuda'), torch.tensor([0, 5], device='cuda'), 2)
except RuntimeError as error:
    print('C++ errors raise:', str(error).splitlines()[0])" 2>&1 | tee -a "$OUT/summary.log"

if want inat || want one-rank; then
step "inat2018 preset data"
timeout "$(limit 90)" python -m alphanet_ext synth --preset inat2018 --out /tmp/inat > "$OUT/inat.log" 2>&1
fi
if want inat; then
step "inat2018 preset, end to end (the paper's iNaturalist settings: 10 epochs, batch 256; rho 1)"
INAT=(fit --train /tmp/inat/train_x.npy --val /tmp/inat/val_x.npy --test /tmp/inat/test_x.npy
  --classifier /tmp/inat/classifier.pt --out /tmp/inat/corrected.pt --epochs 10 --batch-size 256 --rho 1
  --device cuda --report /tmp/inat/report)
env | grep -E "^PYTHON|^MPL" | tee -a "$OUT/inat.log"
# The first run writes the bytecode and matplotlib's font cache, as an install would.
for run in warm-up warm warm; do
  begin=$(date +%s.%N)
  timed timeout "$(limit 60)" python -m alphanet_ext "${INAT[@]}" >> "$OUT/inat.log" 2>&1
  status=$?
  echo "inat2018 fit ($run): exit $status, $(python -c "print(f'{$(date +%s.%N) - $begin:.2f}')") s wall" \
    "(whole command: load, means, neighbours, fit, test, report)" | tee -a "$OUT/inat.log"
  python -c "import json; print('inat2018 fit stages (s):', {k: round(v, 2) for k, v in json.load(open('/tmp/inat/report/report.json'))['runs'][0]['timings'].items()})" \
    2>&1 | tee -a "$OUT/inat.log"
done
timeout "$(limit 60)" python -m cProfile -o "$OUT/inat.prof" -m alphanet_ext "${INAT[@]}" >> "$OUT/inat.log" 2>&1
python -c "import pstats; pstats.Stats('$OUT/inat.prof').sort_stats('cumulative').print_stats(60)" >> "$OUT/inat.log" 2>&1
fi

if want one-rank; then
step "the sharded fit on a one-rank NCCL group against the plain fit"
timeout "$(limit 150)" python benchmarks/bench_one_rank.py --data /tmp/inat --device cuda --repeats 2 --threads 16 2>&1 \
  | tee "$OUT/one_rank.log"
fi

if want extract; then
step "extraction on the GPU"
timeout "$(limit 120)" python benchmarks/bench_extract.py --device cuda --images 4000 --image-size 256 --crop 224 \
  --batch-size 128 --workers 12 --threads 16 --repeats 2 --skip-memory 2>&1 | tee "$OUT/extract.log"
fi

if want distributed; then
step "the class-sharded step at 200,000 classes on one GPU (NCCL, one rank)"
timeout "$(limit 150)" python benchmarks/bench_distributed.py --device cuda --ranks 1 --steps 40 --threads 16 \
  --folder /tmp/dist 2>&1 | tee "$OUT/distributed.log"
fi

if want crt; then
step "cRT against a plain torch loop on the GPU; compare --select on inat2018"
timeout "$(limit 60)" python benchmarks/bench_crt.py --device cuda --preset imagenet-lt --epochs 10 --repeats 2 \
  --threads 16 2>&1 | tee "$OUT/crt.log"
timeout "$(limit 200)" python benchmarks/bench_presets.py --presets inat2018 --device cuda --threads 16 \
  --folder /tmp/presets 2>&1 | tee -a "$OUT/crt.log"
fi

if want tests; then
step "tests"
# no -x: every failure is listed
timeout "$(limit 100)" python -m pytest python_tests -q -p no:cacheprovider -k cuda 2>&1 | tee "$OUT/tests_cuda.log" | tail -15
fi

if want ops; then
step "op benchmarks"
timeout "$(limit 150)" python benchmarks/bench_ops.py --device cuda --sizes "$SIZES" ${OPS:+--ops "$OPS"} --repeats 5 2>&1 \
  | tee "$OUT/bench_ops.log"
fi

if want fit; then
step "fit benchmark (training steps replayed as CUDA graphs, and launched one by one)"
timeout "$(limit 90)" python benchmarks/bench_fit.py --device cuda --sizes "${FIT_SIZES:-imagenet-lt-2048}" \
  --peer-epochs 0 --graphs both 2>&1 | tee "$OUT/bench_fit.log"
fi

if want profile; then
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
fi

if want cpu-tests; then
step "CPU-only tests"
timeout "$(limit 80)" python -m pytest python_tests -q -p no:cacheprovider -k "not cuda" 2>&1 | tee "$OUT/tests.log" | tail -5
fi

step "table"
head -3 "$OUT/summary.log"
for log in tests_cuda tests; do [ -f "$OUT/$log.log" ] && tail -1 "$OUT/$log.log"; done
for log in bench_ops bench_fit one_rank extract distributed; do
  [ -f "$OUT/$log.log" ] && grep -E "^\| |^card|^\(int8 screening|^\(training step|^one |^forward|^largest" "$OUT/$log.log"
done
[ -f "$OUT/inat.log" ] && grep -E "inat2018 fit|Elapsed|Maximum resident|^\| (baseline|AlphaNet)" "$OUT/inat.log"
exit 0
