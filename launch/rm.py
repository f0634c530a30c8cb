"""deepspeed [--num_gpus N] [--hostfile H] launch/rm.py --config CONFIG [key=value ...]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from rlhf.stage_io import main  # noqa: E402
from stages import reward  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("reward", reward.run))
