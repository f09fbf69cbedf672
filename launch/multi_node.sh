#!/usr/bin/env bash
# Several nodes through torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 RDZV_ENDPOINT=head-node:29500 launch/multi_node.sh CONFIG.toml [overrides...]
# NGPU defaults to the GPUs of the node; the rendezvous assigns node ranks.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (e.g. the first node)}"
export NNODES RDZV_ENDPOINT
exec "$(dirname "$0")/../run_train.sh" "$@"
