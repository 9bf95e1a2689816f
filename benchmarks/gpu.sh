#!/usr/bin/env bash
# From a bare GPU machine to one table: install, then the train-step, embedding, seed-scale,
# transformer-tower and MoCo benchmarks against PyTorch on the same device, in 10 minutes on one H200.
#
#   bash benchmarks/gpu.sh                    # table + benchmarks/results/*.json (+ $OUT if set)
#   GPU_REHEARSAL=1 bash benchmarks/gpu.sh    # every part, install included, at test size on the
#                                             # CPU (tests/test_gpu_rehearsal.py runs it in CI)
#
# Install (only what the machine's python3 lacks, from the repository's own files):
#   1. .whl/ present (made by `bash benchmarks/gpu_wheels.sh` where pip reaches a registry, then
#      carried): `pip install --no-index --no-deps --target` into a temporary folder on
#      PYTHONPATH, offline; the package itself runs from the working tree (PYTHONPATH).
#   2. else, if a package registry answers and an NVIDIA GPU is there: a venv .venv-gpu with
#      `pip install -e .[gpu]` (jax[cuda13], torch and the PyTorch side's packages;
#      GPU_EXTRA=gpu-cuda12 for drivers older than 580).
#   3. else: what python3 has, and one line naming what it lacks.
# Budget on one H200 (each part's own limit, in this order, most valuable first; a part never
# runs past GPU_DEADLINE_S = 585 s from the start, so the whole run fits in 10 minutes):
#   install + accelerator check   25 s  (the offline install of .whl/: about 1 s; the rest is
#                                        importing jax and torch and finding the device)
#   train_step                   120 s  (setup + parity, batches 512 and 64, both frameworks)
#   train_step_bf16               75 s  (the same at batch 512, our image tower (ResNet) in
#                                        bfloat16 (Spender has no bfloat16), torch's in float32)
#   embed_float32                 35 s
#   embed_bfloat16_cache          40 s
#   seed_scale                    90 s  (2,048 generated galaxies through the full towers'
#                                        cache views, then 80 epochs x 309 steps on 158,377 cached
#                                        rows through training/loop.py; stops itself at 80 s
#                                        and extrapolates the epochs left)
#   vit_float32, vit_bfloat16     35 s each   (ViT-L/12 forward, ours and timm, + conversion)
#   specformer_float32/bfloat16   25 s each
#   spender_ae                    30 s  (Spender autoencoder step at full size, batch 256, ours vs
#                                        the spender package's model on the same device)
#   moco_step                     50 s  (ResNet50 MoCo v2 step at batch 128: torch, ours, ours
#                                        with augmentation; last, it gets what time is left)
# Limits are caps, not estimates; no part has run on a GPU yet. Each part has its own time limit,
# so a slow part cannot eat the others' time; a part that fails, times out or finds no time left
# is reported, the rest still run, and the script exits 1.
#
# The rehearsal runs the same scripts with the same flags but test sizes, torch on the CPU and no
# deadline, so a typo or a missing file is found in CI, not on the GPU.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX take turns on the same device
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONUNBUFFERED=1
REHEARSAL=${GPU_REHEARSAL:-0}
if [ "$REHEARSAL" = 1 ]; then DEADLINE=${GPU_DEADLINE_S:-0}; else DEADLINE=${GPU_DEADLINE_S:-585}; fi

# ------------------------------------------------------------------------------------ install
# The modules the parts import that a GPU image may lack (benchmarks/gpu_wheels.sh says why each).
NEED=(jax flax optax orbax.checkpoint ml_collections tensorflow_datasets grain torch timm spender)
missing() {  # the NEED modules $PY cannot find, and "jax-cuda" when jax has no CUDA plugin
    "$PY" - "$REHEARSAL" "${NEED[@]}" <<'PYEOF'
import importlib.metadata as md, importlib.util, sys
miss = []
for m in sys.argv[2:]:
    try:
        if importlib.util.find_spec(m) is None:
            miss.append(m)
    except ImportError:
        miss.append(m)
cuda = [d for d in ("jax-cuda13-plugin", "jax-cuda12-plugin") if importlib.util.find_spec("jax")
        and any(True for _ in md.distributions(name=d))]
if not cuda and sys.argv[1] != "1":
    miss.append("jax-cuda")
print(" ".join(miss))
PYEOF
}
have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
registry() { timeout 20 "$PY" -m pip index versions pip >/dev/null 2>&1; }

t_install=$(date +%s%N)
SITE=${TMPDIR:-/tmp}/astroclip-gpu-site
WHL_DIR=${WHL_DIR:-.whl}
WHEELS=("$WHL_DIR"/*.whl)
MISSING=$(missing)
if [ "$REHEARSAL" = 1 ]; then
    # What the GPU run would do, at no cost to this machine's environment: the .whl set installed
    # for CPython 3.12 manylinux into a folder that is then removed (wheel names, tags and one
    # version of each are checked), and the [gpu] extra's requirements parsed.
    echo "install (rehearsal): python3 lacks: ${MISSING:-nothing}"
    if [ -e "${WHEELS[0]}" ]; then
        tmp_site=$(mktemp -d)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$tmp_site" --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "${WHEELS[@]}" \
            || { echo "install: the .whl set does not install for CPython 3.12" >&2; exit 1; }
        echo "install (rehearsal): ${#WHEELS[@]} wheels install offline for CPython 3.12"
        rm -rf "$tmp_site"
    fi
    "$PY" - <<'PYEOF' || exit 1
import tomllib
from packaging.requirements import Requirement
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for name in ("gpu", "gpu-cuda12"):
    print(f"install (rehearsal): .[{name}] =", ", ".join(str(Requirement(r)) for r in extras[name]))
PYEOF
elif [ -z "$MISSING" ]; then
    echo "install: nothing to install ($PY has every package)"
elif ! have_gpu; then
    echo "install: skipped, no NVIDIA GPU here; $PY lacks: $MISSING" >&2
elif [ -e "${WHEELS[0]}" ]; then
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${WHEELS[@]}" || { echo "install: pip could not install $WHL_DIR/" \
        "(gpu_wheels.sh makes them for CPython 3.12; $PY is $("$PY" -V 2>&1))" >&2; exit 1; }
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: ${#WHEELS[@]} wheels from $WHL_DIR/ into $SITE (was missing: $MISSING)"
elif registry; then
    extra=${GPU_EXTRA:-gpu}
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
    [ "${driver%%.*}" -lt 580 ] 2>/dev/null && extra=${GPU_EXTRA:-gpu-cuda12}
    echo "install: $PY lacks $MISSING; a venv .venv-gpu with .[$extra] (driver $driver)"
    [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu || exit 1
    .venv-gpu/bin/python -m pip install -q -e ".[$extra]" || { echo "install: pip failed" >&2; exit 1; }
    PY=.venv-gpu/bin/python
else
    echo "install: no .whl/ and no package registry: $PY lacks $MISSING" \
         "(run bash benchmarks/gpu_wheels.sh where pip works, and bring .whl/)" >&2
fi
echo "install: $(( ($(date +%s%N) - t_install) / 1000000 )) ms"

"$PY" - "$REHEARSAL" <<'PYEOF' || exit 1
import importlib, jax, sys
devs = jax.devices()
print("jax", jax.__version__, "devices:", devs)
if devs[0].platform == "cpu" and sys.argv[1] != "1":
    sys.exit("no accelerator visible to jax (CPU build of jaxlib?): install jax[cuda13] first "
             "(pip install -e .[gpu]), or rehearse on the CPU with GPU_REHEARSAL=1")
bad = []
for m in ("ml_collections", "tensorflow_datasets", "grain", "timm", "spender"):
    try:
        importlib.import_module(m)
    except Exception as e:  # a wrong version fails here, once, not in every part
        bad.append(f"{m} ({type(e).__name__}: {e})"[:160])
print("cannot import:", "; ".join(bad), file=sys.stderr) if bad else print("imports: ok")
try:
    import torch
    print("torch", torch.__version__, "cuda:", torch.cuda.is_available())
except ImportError:
    print("torch missing: the PyTorch side of every comparison will fail")
PYEOF

# ------------------------------------------------------------------------------------ parts
status=0
PARTS=$(mktemp)
part() {  # part NAME SECONDS JSON CMD...: runs CMD under min(SECONDS, time left) if any is left
    local name=$1 limit=$2 json=$3; shift 3
    local t0=$SECONDS left
    if [ "$DEADLINE" -gt 0 ]; then
        left=$((DEADLINE - SECONDS))
        if [ "$left" -lt 15 ]; then
            echo "=== $name SKIPPED: ${left}s left of the ${DEADLINE}s run" >&2
            printf '%s\tSKIPPED\t0\t%s\n' "$name" "$json" >>"$PARTS"
            status=1
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "=== $name (limit ${limit}s)"
    if timeout --signal=INT --kill-after=10 "$limit" "$@"; then
        echo "=== $name done in $((SECONDS - t0)) s"
        printf '%s\tdone\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$json" >>"$PARTS"
    else
        echo "=== $name FAILED or timed out after $((SECONDS - t0)) s" >&2
        printf '%s\tFAILED\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$json" >>"$PARTS"
        status=1
    fi
}

if [ "$REHEARSAL" = 1 ]; then  # test sizes, torch on the CPU, limits for a 2-core machine
    DEV=cpu LABEL=rehearsal SIZE=test BATCHES=16 CACHE_N=64 EMBED_CACHE_N=64 CACHE_BATCH=16
    MOCO=(--sizes test --batch-small 8 --steps 1 --augment)
    EMBED=(--size=test --batch=16 --batches=2)
    SEED=(--size=test --galaxies=32 --rows=1024 --val-rows=200 --epochs=2 --batch=64)
    VIT=test SPEC=test TBATCH=2 ITERS=1
    LIMIT_TRAIN=300 LIMIT_MOCO=300 LIMIT_EMBED=120 LIMIT_EMBED_CACHE=120 LIMIT_SEED=180
    LIMIT_VIT=120 LIMIT_SPEC=120 LIMIT_TRAIN_BF16=300 LIMIT_SPENDER_AE=120
    SPENDER_AE=(--sizes test --batch 8 --steps 1 --repeats 1)
else
    DEV=cuda LABEL=gpu SIZE=full BATCHES=512,64 CACHE_N=16384 EMBED_CACHE_N=8192 CACHE_BATCH=1024
    MOCO=(--sizes resnet50 --batch-full 128 --steps 10 --augment)  # 3 compiles, not 5
    EMBED=(--size=full --batch=1024 --batches=20)
    SEED=(--size=full --galaxies=2048 --time-limit=80)
    VIT=vit_large_p12 SPEC=specformer TBATCH=64 ITERS=5
    LIMIT_TRAIN=120 LIMIT_MOCO=50 LIMIT_EMBED=35 LIMIT_EMBED_CACHE=40 LIMIT_SEED=90
    LIMIT_VIT=35 LIMIT_SPEC=25 LIMIT_TRAIN_BF16=75 LIMIT_SPENDER_AE=30
    SPENDER_AE=(--sizes spender --batch 256 --steps 10 --repeats 1)
fi

J="$RESULTS/train_step-$LABEL.json"
part train_step $LIMIT_TRAIN "$J" "$PY" benchmarks/train_step.py --size=$SIZE --batches=$BATCHES \
    --steps=10 --warmup=2 --cache-n=$CACHE_N --torch-device=$DEV --out="$J"
# Our image tower in bfloat16 (batch 512 only; torch's step stays float32, said in the JSON).
J="$RESULTS/train_step-$LABEL-bfloat16.json"
part train_step_bf16 $LIMIT_TRAIN_BF16 "$J" "$PY" benchmarks/train_step.py --size=$SIZE \
    --batches=${BATCHES%%,*} --steps=10 --warmup=2 --cache-n=$CACHE_N --torch-device=$DEV \
    --image-dtype=bfloat16 --out="$J"
J="$RESULTS/embed_throughput-$LABEL-float32.json"
part embed_float32 $LIMIT_EMBED "$J" "$PY" benchmarks/embed_throughput.py "${EMBED[@]}" \
    --dtype=float32 --cache-n=0 --out="$J"
J="$RESULTS/embed_throughput-$LABEL-bfloat16.json"
part embed_bfloat16_cache $LIMIT_EMBED_CACHE "$J" "$PY" benchmarks/embed_throughput.py \
    "${EMBED[@]}" --dtype=bfloat16 --cache-n=$EMBED_CACHE_N --cache-batch=$CACHE_BATCH --out="$J"
J="$RESULTS/seed_scale-$LABEL.json"
part seed_scale $LIMIT_SEED "$J" "$PY" benchmarks/seed_scale.py "${SEED[@]}" --out="$J"
# The released AstroCLIP's towers, ours vs PyTorch on the same device, same weights:
# AstroDINO ViT-L/12 (AstroCLIP's token path) and SpecFormer 768 x 6, float32 and bfloat16.
for dtype in float32 bfloat16; do
    part vit_$dtype $LIMIT_VIT "$RESULTS/vit_forward-$LABEL-$dtype.json" \
        "$PY" benchmarks/vit_forward.py --size=$VIT --path=tokens \
        --batch=$TBATCH --iters=$ITERS --dtype=$dtype --label=$LABEL-$dtype --results="$RESULTS"
    J="$RESULTS/specformer_forward-$LABEL-$dtype.json"
    part specformer_$dtype $LIMIT_SPEC "$J" "$PY" benchmarks/specformer_forward.py --sizes $SPEC \
        --batch=$((2 * TBATCH)) --steps=$ITERS --dtype=$dtype --out="$J"
done
J="$RESULTS/spender_autoencoder_step-$LABEL.json"
part spender_ae $LIMIT_SPENDER_AE "$J" "$PY" benchmarks/spender_autoencoder_step.py \
    "${SPENDER_AE[@]}" --torch-device=$DEV --out="$J"
part moco_step $LIMIT_MOCO "$RESULTS/moco_step-$LABEL.json" "$PY" benchmarks/moco_step.py \
    "${MOCO[@]}" --torch-device=$DEV --label $LABEL --results="$RESULTS"

# ------------------------------------------------------------------------------------ table
echo
echo "=== $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS)) s in all, install included"
"$PY" benchmarks/gpu_table.py "$PARTS" --out="$RESULTS/gpu_table.txt" \
    --merged="${OUT:+$OUT/gpu_results.json}" || status=1
if [ -n "${OUT:-}" ]; then  # a device call brings back at most 8 files: the table, one JSON
    cp "$RESULTS/gpu_table.txt" "$OUT/" 2>/dev/null
fi
rm -f "$PARTS"
exit $status
