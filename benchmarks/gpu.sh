#!/usr/bin/env bash
# Train-step, feature-cache, embedding and transformer-tower benchmarks on one accelerator, in
# about 12 minutes.
#
#   bash benchmarks/gpu.sh                    # writes benchmarks/results/*.json (and to $OUT if set)
#   GPU_REHEARSAL=1 bash benchmarks/gpu.sh    # every part at test size on the CPU (CI runs this)
#
# Needs a CUDA build of jax (and of torch for the PyTorch side). Each part has its own time limit,
# so a slow part cannot eat the others' time; a part that fails is reported, the rest still run,
# and the script exits 1.
# Budget (H200, measured shapes): train step (setup + parity, batches 512 and 64, both
# frameworks) <= 170 s; MoCo v2 step (small and resnet50, torch, ours, ours with augmentation:
# five compiles; a guess, not yet measured on a GPU) <= 240 s; embedding float32 <= 60 s;
# embedding bfloat16 + cache <= 60 s; ViT-L/12 forward (ours and timm, with the conversion)
# <= 60 s per dtype; SpecFormer forward <= 45 s per dtype.
#
# The rehearsal runs the same scripts with the same flags but test sizes and torch on the CPU,
# so a typo or a missing file is found in CI (tests/test_gpu_rehearsal.py), not on the GPU.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX take turns on the same device
export TF_CPP_MIN_LOG_LEVEL=2
REHEARSAL=${GPU_REHEARSAL:-0}

"$PY" - "$REHEARSAL" <<'PYEOF' || exit 1
import jax, sys
devs = jax.devices()
print("jax", jax.__version__, "devices:", devs)
if devs[0].platform == "cpu" and sys.argv[1] != "1":
    sys.exit("no accelerator visible to jax (CPU build of jaxlib?): install jax[cuda12] first, "
             "or rehearse on the CPU with GPU_REHEARSAL=1")
try:
    import torch
    print("torch", torch.__version__, "cuda:", torch.cuda.is_available())
except ImportError:
    print("torch missing: the PyTorch side of the train-step benchmark will fail")
PYEOF

status=0
part() {  # part NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    if timeout --signal=INT --kill-after=10 "$limit" "$@"; then
        echo "=== $name done in $((SECONDS - t0)) s"
    else
        echo "=== $name FAILED or timed out after $((SECONDS - t0)) s" >&2
        status=1
    fi
}

if [ "$REHEARSAL" = 1 ]; then  # test sizes, torch on the CPU, limits for a 2-core machine
    DEV=cpu LABEL=rehearsal SIZE=test BATCHES=16 CACHE_N=64 EMBED_CACHE_N=64 CACHE_BATCH=16
    MOCO=(--sizes test --batch-small 8 --steps 1 --augment)
    EMBED=(--size=test --batch=16 --batches=2)
    VIT=test SPEC=test TBATCH=2 ITERS=1
    LIMIT_TRAIN=300 LIMIT_MOCO=300 LIMIT_EMBED=120 LIMIT_VIT=120 LIMIT_SPEC=120
else
    DEV=cuda LABEL=gpu SIZE=full BATCHES=512,64 CACHE_N=16384 EMBED_CACHE_N=8192 CACHE_BATCH=1024
    MOCO=(--sizes small resnet50 --batch-small 256 --batch-full 128 --steps 10 --augment)
    EMBED=(--size=full --batch=1024 --batches=20)
    VIT=vit_large_p12 SPEC=specformer TBATCH=64 ITERS=5
    LIMIT_TRAIN=170 LIMIT_MOCO=240 LIMIT_EMBED=60 LIMIT_VIT=60 LIMIT_SPEC=45
fi

part train_step $LIMIT_TRAIN "$PY" benchmarks/train_step.py --size=$SIZE --batches=$BATCHES \
    --steps=10 --warmup=2 --cache-n=$CACHE_N --torch-device=$DEV \
    --out="$RESULTS/train_step-$LABEL.json"
part moco_step $LIMIT_MOCO "$PY" benchmarks/moco_step.py "${MOCO[@]}" --torch-device=$DEV \
    --label $LABEL --results="$RESULTS"
part embed_float32 $LIMIT_EMBED "$PY" benchmarks/embed_throughput.py "${EMBED[@]}" \
    --dtype=float32 --cache-n=0 --out="$RESULTS/embed_throughput-$LABEL-float32.json"
part embed_bfloat16_cache $LIMIT_EMBED "$PY" benchmarks/embed_throughput.py "${EMBED[@]}" \
    --dtype=bfloat16 --cache-n=$EMBED_CACHE_N --cache-batch=$CACHE_BATCH \
    --out="$RESULTS/embed_throughput-$LABEL-bfloat16.json"
# The released AstroCLIP's towers, ours vs PyTorch on the same device, same weights:
# AstroDINO ViT-L/12 (AstroCLIP's token path) and SpecFormer 768 x 6, float32 and bfloat16.
for dtype in float32 bfloat16; do
    part vit_$dtype $LIMIT_VIT "$PY" benchmarks/vit_forward.py --size=$VIT --path=tokens \
        --batch=$TBATCH --iters=$ITERS --dtype=$dtype --label=$LABEL-$dtype --results="$RESULTS"
    part specformer_$dtype $LIMIT_SPEC "$PY" benchmarks/specformer_forward.py --sizes $SPEC \
        --batch=$((2 * TBATCH)) --steps=$ITERS --dtype=$dtype \
        --out="$RESULTS/specformer_forward-$LABEL-$dtype.json"
done

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp "$RESULTS"/*.json "$OUT/results/" 2>/dev/null
fi
ls -l "$RESULTS"
exit $status
