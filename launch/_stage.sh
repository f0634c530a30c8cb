#!/usr/bin/env bash
# Shared by sft.sh / rm.sh / ppo.sh: run one stage under the deepspeed launcher.
#   NUM_GPUS   processes on this node (GPUs, or CPU processes on a machine without GPUs); default:
#              every GPU torch sees (CUDA_VISIBLE_DEVICES limits them), as DeepSpeed's launcher does;
#              1 on a machine without GPUs
#   HOSTFILE   a deepspeed hostfile for multi-node runs (DIR must be on a shared filesystem)
#   MASTER_PORT  rendezvous port; default 29500
#   RLHF_PYTHON  the interpreter whose DeepSpeed runs the stage; default python3 (else python) on PATH.
#                The launcher is run as `$RLHF_PYTHON -m deepspeed.launcher.runner` (what the `deepspeed`
#                script runs) rather than `deepspeed` from PATH, and it starts its ranks with that same
#                interpreter: an environment that is not activated works when named here.
set -euo pipefail
stage_py="$1"; shift
if [ $# -lt 1 ]; then
  echo "usage: bash launch/$(basename "$stage_py" .py).sh CONFIG [key=value ...]" >&2
  exit 2
fi
config="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${RLHF_PYTHON:-$(command -v python3 || command -v python || echo python3)}"
args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
  [ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
else
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS="$("$python" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)"
  fi
  args+=(--num_gpus "$NUM_GPUS")
fi
# The launcher and its ranks run in a process group of their own (set -m), which a stop signal reaches
# as a whole: SIGTERM (a batch scheduler's stop), SIGINT (Ctrl-C) or SIGHUP sent to this script is
# passed on as SIGTERM to every process of the stage; each rank stops at once (nothing is published,
# the artifact directory's lock is released) and the stage resumes from its last checkpoint when re-run.
# Whatever is still running RLHF_STOP_GRACE seconds later (default 20) is killed.
grace="${RLHF_STOP_GRACE:-20}"
set -m
"$python" -m deepspeed.launcher.runner "${args[@]}" "$here/$stage_py" --config "$config" "$@" &
pid=$!
stop() {
  trap '' TERM INT HUP
  echo "[launcher] $1: stopping every process of the stage (SIGTERM; SIGKILL after ${grace}s)" >&2
  kill -TERM -- "-$pid" 2>/dev/null || true
  (sleep "$grace"; kill -KILL -- "-$pid" 2>/dev/null) &
  watchdog=$!
  wait "$pid" 2>/dev/null || true
  for ((i = 0; i < (grace + 5) * 5; i++)); do  # its ranks, reparented when the launcher is gone
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$watchdog" 2>/dev/null || true  # it ignores TERM, as this trap does
  exit "$2"
}
trap 'stop SIGTERM 143' TERM
trap 'stop SIGINT 130' INT
trap 'stop SIGHUP 129' HUP
rc=0
wait "$pid" || rc=$?
exit "$rc"
