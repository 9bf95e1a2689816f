#!/usr/bin/env bash
# Train-step, feature-cache, embedding and transformer-tower benchmarks on one accelerator, in
# about 12 minutes.
#
#   bash benchmarks/gpu.sh            # writes benchmarks/results/*.json (and copies to $OUT if set)
#
# Needs a CUDA build of jax (and of torch for the PyTorch side). Each part has its own time limit,
# so a slow part cannot eat the others' time; a part that fails is reported and the rest still run.
# Budget (H200, measured shapes): train step (setup + parity, batches 512 and 64, both
# frameworks) <= 170 s; MoCo v2 step (small and resnet50, torch, ours, ours with augmentation:
# five compiles; a guess, not yet measured on a GPU) <= 240 s; embedding float32 <= 60 s;
# embedding bfloat16 + cache <= 60 s; ViT-L/12 forward (ours and timm, with the conversion)
# <= 60 s per dtype; SpecFormer forward <= 45 s per dtype.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX take turns on the same device
export TF_CPP_MIN_LOG_LEVEL=2

"$PY" - <<'EOF' || exit 1
import jax, sys
devs = jax.devices()
print("jax", jax.__version__, "devices:", devs)
if devs[0].platform == "cpu":
    sys.exit("no accelerator visible to jax (CPU build of jaxlib?): install jax[cuda12] first")
try:
    import torch
    print("torch", torch.__version__, "cuda:", torch.cuda.is_available())
except ImportError:
    print("torch missing: the PyTorch side of the train-step benchmark will fail")
EOF

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

part train_step 170 "$PY" benchmarks/train_step.py --size=full --batches=512,64 \
    --steps=10 --warmup=2 --cache-n=16384 --torch-device=cuda
part moco_step 240 "$PY" benchmarks/moco_step.py --sizes small resnet50 --batch-small 256 \
    --batch-full 128 --steps 10 --augment --torch-device=cuda --label gpu
part embed_float32 60 "$PY" benchmarks/embed_throughput.py --size=full --dtype=float32 \
    --batch=1024 --batches=20 --cache-n=0
part embed_bfloat16_cache 60 "$PY" benchmarks/embed_throughput.py --size=full --dtype=bfloat16 \
    --batch=1024 --batches=20 --cache-n=8192 --cache-batch=1024
# The released AstroCLIP's towers, ours vs PyTorch on the same device, same weights:
# AstroDINO ViT-L/12 (AstroCLIP's token path) and SpecFormer 768 x 6, float32 and bfloat16.
part vit_float32 60 "$PY" benchmarks/vit_forward.py --size=vit_large_p12 --path=tokens \
    --batch=64 --iters=5 --label=gpu-float32
part vit_bfloat16 60 "$PY" benchmarks/vit_forward.py --size=vit_large_p12 --path=tokens \
    --batch=64 --iters=5 --dtype=bfloat16 --label=gpu-bfloat16
part specformer_float32 45 "$PY" benchmarks/specformer_forward.py --sizes specformer \
    --batch=128 --steps=5 --out="$RESULTS/specformer_forward-gpu-float32.json"
part specformer_bfloat16 45 "$PY" benchmarks/specformer_forward.py --sizes specformer \
    --batch=128 --steps=5 --dtype=bfloat16 --out="$RESULTS/specformer_forward-gpu-bfloat16.json"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp "$RESULTS"/*.json "$OUT/results/" 2>/dev/null
fi
ls -l "$RESULTS"
exit $status
