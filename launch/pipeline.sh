#!/usr/bin/env bash
# bash launch/pipeline.sh CONFIG [key=value ...]
# SFT -> RM -> PPO, each under the deepspeed launcher (NUM_GPUS, HOSTFILE, MASTER_PORT honoured).
# A stage whose artifact is complete and up to date is skipped; force=true reruns it.
# The first failing stage stops the pipeline, naming the stage and its log.
# RLHF_PYTHON: the environment's interpreter (default python3, else python, on PATH); the driver runs
# every stage with it too (launch/_stage.sh), so the environment need not be activated.
exec "${RLHF_PYTHON:-$(command -v python3 || command -v python || echo python3)}" -m rlhf.cli pipeline "$@"
