#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the wheels that `bash benchmarks/gpu.sh` needs on a GPU machine
# that cannot reach a package registry, such as the H200 this workplace lends: Python 3.12,
# x86-64 manylinux, jax/torch/flax/optax/orbax/h5py/timm/... already there (the image's list:
# /work/.library/device/KINDS.md). Run it HERE, where the registries answer:
#
#   bash benchmarks/gpu_wheels.sh        # then carry .whl; gpu.sh installs it offline (--no-deps)
#
# The set is what the GPU parts import that the image lacks, found by running the CPU rehearsal
# with those packages hidden (every part, every worker process):
#   configs/*.py                   ml_collections
#   data/pipeline.py (train step)  tensorflow_datasets (+ tensorflow_metadata, promise, toml,
#                                  immutabledict, array_record, imported when tfds is) and grain
#                                  (+ portpicker)
#   torch side of the train step   spender (+ nflows, GPUtil, its import-time needs)
#   protobuf                       tensorflow_metadata's generated code needs protobuf >= 6.31;
#                                  the image's version is not recorded, so the tested one travels
# Not carried (imported by no GPU part): umap-learn, faiss-cpu, fastapi, uvicorn, astropy,
# tensorboardX (training/metrics.py skips it when absent), dm-tree, simple_parsing, termcolor.
# Versions are the ones the project's venv here runs (tested together); promise, nflows and
# GPUtil exist only as source archives, so they are built here into pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${WHL_DIR:-.whl}
LIMIT=$((64 * 1024 * 1024))  # what travels to the device machine: repository + carried paths

BINARY=(  # name==version: wheels for CPython 3.12 on manylinux x86-64
    ml_collections==1.1.0
    tensorflow_datasets==4.9.10
    tensorflow_metadata==1.21.0
    immutabledict==4.3.1
    toml==0.10.2
    array_record==0.8.6
    grain==0.2.18
    portpicker==1.6.0
    spender==0.3
    protobuf==7.36.2
)
SOURCE_ONLY=(promise==2.3 nflows==0.14 GPUtil==1.4.0)  # no wheel on the registry
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

t0=$SECONDS
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST.tmp" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST.tmp" "${SOURCE_ONLY[@]}"
for f in "$DEST.tmp"/*.whl; do  # what was built here must be pure Python to run there
    case "$f" in *-py2.py3-none-any.whl|*-py3-none-any.whl|*cp312*|*abi3*) ;;
        *) echo "gpu_wheels: $f is not for CPython 3.12" >&2; exit 1 ;;
    esac
done
n_wheels=$(ls "$DEST.tmp"/*.whl | wc -l)
if [ "$n_wheels" -ne $((${#BINARY[@]} + ${#SOURCE_ONLY[@]})) ]; then
    echo "gpu_wheels: $n_wheels wheels for $((${#BINARY[@]} + ${#SOURCE_ONLY[@]})) names" >&2
    exit 1
fi
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"

ls -l "$DEST" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
repo=$(git ls-files -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | du --files0-from=- -cb 2>/dev/null \
    | tail -1 | cut -f1)
total=$((wheels + repo + ${untracked:-0}))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels $(mib "$wheels") ($n_wheels files) + repository $(mib "$repo") + untracked" \
     "$(mib "${untracked:-0}") = $(mib "$total") of the 64 MiB that may travel" \
     "($((SECONDS - t0)) s)"
if [ "$total" -gt "$LIMIT" ]; then
    echo "gpu_wheels: over the 64 MiB a device call carries" >&2
    exit 1
fi
