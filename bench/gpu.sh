#!/usr/bin/env bash
# The GPU measurements in one call, sized for a short lease (about 10 minutes with the compiles):
# the default CUDA decode step of a bf16 GLM-4-9B-shaped model against its candidates (attention
# through SDPA; q, k and v as one matrix; the next step queued ahead of the host; all three;
# attention as fused reductions), with transformers in the same run, then where the default step's
# time goes. Each command is bounded, so one that runs long cannot take the other's time. The
# output is also written to $OUT/gpu.log when $OUT is set.
#
#     bash bench/gpu.sh              # bf16: the candidates, then the profile (about 10 minutes)
#     bash bench/gpu.sh quantized    # int4 (tinygemm) and int8 at batch 1 (about 4 minutes)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
log=${OUT:+$OUT/gpu.log}
run() {
    local limit=$1
    shift
    echo "== $(date +%T) python3 $* (at most ${limit} s)"
    timeout "$limit" python3 "$@"
    echo "== exit status $?"
}
{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader
    if [ "${1:-}" = quantized ]; then
        # int8 compiles with coordinate descent tuning, which takes minutes: last.
        run 260 bench/decode.py --gpu --budget 240 --batches "" --long 0 --rounds 2 --skip-transformers \
            --variants bf16,int4,int8
    else
        # The candidates most likely to pay first: those whose compile would start past half the
        # budget are left out (and said to be), so the run still ends with figures for the others.
        run 420 bench/decode.py --gpu --budget 380 --batches "" --long 0 --rounds 2 \
            --variants bf16,bf16+overlap,bf16+sdpa+qkv+overlap,bf16+sdpa,bf16+qkv,bf16+reduce
        run 150 bench/profile_step.py --gpu --top 30
    fi
} 2>&1 | tee ${log:-/dev/null}
