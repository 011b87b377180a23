#!/usr/bin/env bash
# The first run on a CUDA GPU: everything the CPU could only stand in for, in one script.
#   bash benchmarks/first_gpu_run.sh [OUT]      (OUT defaults to $OUT, else results/first_gpu_run)
# Each step writes its JSON / tables under OUT and the script goes on when one fails; the summary
# at the end says which failed. On an H100 the whole script takes about 10-15 minutes; the steps are
# ordered so that the cheap correctness checks come first.
set -u
OUT=${1:-${OUT:-results/first_gpu_run}}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$(pwd)} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
failed=()
step() { local name=$1; shift; echo "== $name: $*"; if ! "$@" > >(tee "$OUT/$name.log") 2>&1; then failed+=("$name"); fi; }

# 1. correctness on the real device: dtype choice, host syncs per step, from_pipe of offloaded /
#    compiled pipelines, one line for a missing GPU and for out-of-memory, cross-process determinism
step cuda_checks python benchmarks/cuda_checks.py --out "$OUT/cuda_checks.json"
# 2. the CPU stand-in tests, run on this machine too (they must not depend on the absence of a GPU)
step device_tests python -m pytest -q -x tests/test_device_placement.py
# 3. half precision on the test bed: training + reconstruction per dtype (float16-autocast trains
#    with loss scaling), then the edit benchmark in the GPU's default dtype beside float32
step precision python benchmarks/precision_check.py --device cuda --size testbed \
    --precision_dtypes bfloat16,float16,bfloat16-autocast,float16-autocast,float32-explicit --out "$OUT/precision.json"
for dt in float32 auto; do
  step "testbed_edit_$dt" python benchmarks/testbed_edit.py --device cuda --dtype $dt --n 16 --num_ddim_steps 20 \
      --num_inner_steps 10 --methods stylediffusion:p2plus stylediffusion:p2p directinv:p2p nulltext:p2p ddim:p2p \
      --outdir "$OUT/testbed_edit_$dt"
  step "testbed_recon_T10_$dt" python benchmarks/testbed_edit.py --device cuda --dtype $dt --n 16 --num_ddim_steps 10 \
      --num_inner_steps 10 --methods directinv:p2p nulltext:p2p --kinds colour --outdir "$OUT/testbed_recon_T10_$dt"
done
# 4. speed at SD v1.5 size (docs/performance.md's targets)
step gpu_bench python benchmarks/gpu_bench.py --device cuda --size sd15 --out "$OUT/gpu_bench.json"
step gpu_bench_fp16 python benchmarks/gpu_bench.py --device cuda --size sd15 --modes fast --fast_dtype float16 \
    --out "$OUT/gpu_bench_fp16.json"
step gpu_bench_compile python benchmarks/gpu_bench.py --device cuda --size sd15 --modes fast --compile \
    --out "$OUT/gpu_bench_compile.json"

echo "== done: results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED steps: ${failed[*]}"; exit 1; fi
echo "every step ran"
