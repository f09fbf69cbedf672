#!/usr/bin/env bash
# Train titan-hybrid with torchrun: ./run_train.sh CONFIG.toml [--section.key value ...]
#
# Environment: NGPU (processes per node; default: the GPUs CUDA_VISIBLE_DEVICES names or nvidia-smi
# lists when torch is a CUDA build, else 2 CPU ranks),
# NNODES (default 1), RDZV_ENDPOINT (host:port of the c10d rendezvous, multi-node only; it assigns
# the node ranks),
# PYTHON (interpreter; default python3), LOG_RANK (ranks whose output is shown; default 0),
# TITAN_HYBRID_CACHE_DIR (default ./.cache): one folder for the compile caches below, so a restart
# reuses what earlier runs compiled and tuned (each variable, set by you, wins):
#   TRITON_CACHE_DIR=$TITAN_HYBRID_CACHE_DIR/triton: compiled Triton kernels (fla's, Inductor's);
#   TRITON_CACHE_AUTOTUNING=1: triton.autotune keeps each kernel's timings there too, so fla's
#     autotuning (minutes per new GPU, head size, dtype) runs once; fla 0.6 asks for this for its
#     own kernels (FLA_CACHE_RESULTS=1), the knob extends it to every autotuned Triton kernel;
#   TORCHINDUCTOR_CACHE_DIR=$TITAN_HYBRID_CACHE_DIR/inductor: Inductor's compiled code (C++ on CPU)
#     and autotuning results (FlexAttention's max-autotune), with the caches that find them again:
#   TORCHINDUCTOR_FX_GRAPH_CACHE=1, TORCHINDUCTOR_AUTOGRAD_CACHE=1: Inductor's FX-graph cache and
#     AOTAutograd's forward + backward cache (on by default in torch 2.11-2.13; forced on here).
#   Dynamo still traces each block kind at every start (seconds); bench/warm_start.py measures both.
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
REPO=$(dirname "$(realpath "$0")")
TITAN_HYBRID_CACHE_DIR=$(realpath -m "${TITAN_HYBRID_CACHE_DIR:-$REPO/.cache}")  # before the cd, like CONFIG_FILE
export TITAN_HYBRID_CACHE_DIR
cd "$REPO"

PYTHON=${PYTHON:-python3}
if [[ -z "${NGPU:-}" ]]; then
    # As torch.cuda.device_count() counts them, without importing torch (that took seconds).
    GPUS=$("$PYTHON" -m titan_hybrid.platform.gpu_count)
    if [[ "$GPUS" -gt 0 ]]; then
        NGPU=$GPUS
    else
        NGPU=2  # CPU: gloo ranks
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
fi
NNODES=${NNODES:-1}
LOG_RANK=${LOG_RANK:-0}

# Compile caches (see the header): fla's autotuning and Inductor's compiles are most of a cold start.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TITAN_HYBRID_CACHE_DIR/triton}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$TITAN_HYBRID_CACHE_DIR/inductor}
export TORCHINDUCTOR_FX_GRAPH_CACHE=${TORCHINDUCTOR_FX_GRAPH_CACHE:-1}
export TORCHINDUCTOR_AUTOGRAD_CACHE=${TORCHINDUCTOR_AUTOGRAD_CACHE:-1}

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
