#!/usr/bin/env bash
# bash launch/pipeline.sh CONFIG [key=value ...]
# SFT -> RM -> PPO, each under the deepspeed launcher (NUM_GPUS, HOSTFILE, MASTER_PORT honoured).
# A stage whose artifact is complete and up to date is skipped; force=true reruns it.
# The first failing stage stops the pipeline, naming the stage and its log.
exec python -m rlhf.cli pipeline "$@"
