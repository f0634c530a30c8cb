#!/usr/bin/env bash
# Shared by sft.sh / rm.sh / ppo.sh: run one stage under the deepspeed launcher.
#   NUM_GPUS   processes on this node (GPUs, or CPU processes on a machine without GPUs); default 1
#   HOSTFILE   a deepspeed hostfile for multi-node runs (DIR must be on a shared filesystem)
#   MASTER_PORT  rendezvous port; default 29500
set -euo pipefail
stage_py="$1"; shift
if [ $# -lt 1 ]; then
  echo "usage: bash launch/$(basename "$stage_py" .py).sh CONFIG [key=value ...]" >&2
  exit 2
fi
config="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
  [ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
else
  args+=(--num_gpus "${NUM_GPUS:-1}")
fi
exec deepspeed "${args[@]}" "$here/$stage_py" --config "$config" "$@"
