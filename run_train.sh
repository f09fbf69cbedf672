#!/usr/bin/env bash
# Train titan-hybrid with torchrun: ./run_train.sh CONFIG.toml [--section.key value ...]
#
# Environment: NGPU (processes per node; default: GPUs present, else 2 CPU ranks),
# NNODES (default 1), RDZV_ENDPOINT (host:port of the c10d rendezvous, multi-node only; it assigns
# the node ranks),
# PYTHON (interpreter; default python3), LOG_RANK (ranks whose output is shown; default 0),
# TRITON_CACHE_DIR (GPU: where tuned Triton kernels persist; default ./.cache/triton),
# RESUME_STEP (resume from this step-N checkpoint; by default, with [checkpoint] enable, the run
# resumes from the newest complete checkpoint in its folder, see docs/checkpointing.md).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.toml [--section.key value ...]" >&2
    exit 2
fi
CONFIG_FILE=$(realpath "$1"); shift
if [[ ! -f "$CONFIG_FILE" ]]; then
    echo "run_train.sh: config file '$CONFIG_FILE' does not exist" >&2
    exit 2
fi
cd "$(dirname "$(realpath "$0")")"

PYTHON=${PYTHON:-python3}
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [[ "$GPUS" -gt 0 ]]; then
    NGPU=${NGPU:-$GPUS}
    # fla autotunes its Triton kernels on first use (minutes); Triton keeps the tuned configs in
    # its cache, so a cache that outlives the run makes every later start take seconds.
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
else
    NGPU=${NGPU:-2}  # CPU: gloo ranks
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
NNODES=${NNODES:-1}
LOG_RANK=${LOG_RANK:-0}

if [[ "$NNODES" -gt 1 ]]; then
    RDZV=(--rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for multi-node runs}")
else
    RDZV=(--standalone)
fi

RESUME=()
if [[ -n "${RESUME_STEP:-}" ]]; then
    RESUME=(--checkpoint.load_step "$RESUME_STEP")
fi

# torchrun (titan_hybrid/run.py: it prints the failing rank's error last). exec: it keeps this pid,
# the parent every rank checks for (titan_hybrid/lifetime.py).
export TITAN_HYBRID_LAUNCHER_PID=$$
exec "$PYTHON" -m titan_hybrid.run \
    --nnodes "$NNODES" --nproc_per_node "$NGPU" "${RDZV[@]}" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m titan_hybrid.train --job.config_file "$CONFIG_FILE" "${RESUME[@]}" "$@"
