"""rlhf: a three-stage RLHF pipeline (SFT -> reward model -> PPO) under DeepSpeed ZeRO.

Importing this package starts nothing: no process group, no W&B run, no downloads.
"""
__version__ = "0.1.0"
