#!/usr/bin/env bash
# bash launch/rm.sh CONFIG [key=value ...]   (NUM_GPUS, HOSTFILE, MASTER_PORT from the environment)
exec bash "$(dirname "${BASH_SOURCE[0]}")/_stage.sh" rm.py "$@"
