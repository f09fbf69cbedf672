#!/usr/bin/env bash
# One node, all its GPUs: launch/single_node.sh CONFIG.toml [overrides...]
set -euo pipefail
exec "$(dirname "$0")/../run_train.sh" "$@"
