#!/usr/bin/env bash
# Issue 17's GPU tables in one run: training step (fp32, bf16, fp16; FLOP utilisation against the same run's matmul
# peak in that precision; the largest batch that fits, in bf16), sampling (fp32, bf16) and torch.compile on / off
# (bf16, then fp32), ours against diffusers' same-size models. Each table is its own command under a time limit,
# most wanted first, so a run cut short still returns the tables it finished.
#
#     bash benchmarks/gpu_tables.sh [OUTPUT_DIR]        # default benchmarks/results/gpu; about 6-8 min on one H100
#
# On a machine lent through the device tool (its image has torch but not diffusers): first, here,
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then run `bash benchmarks/gpu_tables.sh $OUT` there with `.whl` carried: the wheels in `.whl/` are installed into
# /tmp/site first. The script refuses to run without a CUDA device: the CPU tables come from the scripts themselves.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUTPUT_DIR"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_tables.sh: torch sees no CUDA device')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTPUT_DIR/device.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUTPUT_DIR/device.txt"

failed=0
step() {  # step SECONDS NAME COMMAND...: run one table under a time limit, log it, go on whatever happens
    local limit=$1 name=$2
    shift 2
    echo "== $name: $* (limit ${limit} s)"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUTPUT_DIR/$name.log" | grep -v "^round " || failed=1
    echo "== $name: done in $((SECONDS - started)) s"
}

MODELS="--models unet,dit,mmdit --batch_size 128 --rounds 15 --device cuda"
step 60 models_fp32 python3 benchmarks/bench_models.py $MODELS --precision fp32 --out "$OUTPUT_DIR/models_fp32.md"
step 150 models_bf16 python3 benchmarks/bench_models.py $MODELS --precision bf16 --largest_batch \
    --out "$OUTPUT_DIR/models_bf16.md"
step 60 models_fp16 python3 benchmarks/bench_models.py $MODELS --precision fp16 --out "$OUTPUT_DIR/models_fp16.md"
step 60 sampling_fp32 python3 benchmarks/bench_sampling.py --device cuda --dtype fp32 --out "$OUTPUT_DIR/sampling_fp32.md"
step 60 sampling_bf16 python3 benchmarks/bench_sampling.py --device cuda --dtype bf16 --out "$OUTPUT_DIR/sampling_bf16.md"
step 150 compile_bf16 python3 benchmarks/bench_compile.py --device cuda --precision bf16 --batch_size 128 \
    --out "$OUTPUT_DIR/compile_bf16.md"
step 150 compile_fp32 python3 benchmarks/bench_compile.py --device cuda --precision fp32 --batch_size 128 \
    --out "$OUTPUT_DIR/compile_fp32.md"
ls -l "$OUTPUT_DIR"
exit $failed
