"""CPU ranks on one machine share its cores instead of each starting one thread per core."""
from __future__ import annotations

import os

import torch

from rlhf.distributed import share_cpu_threads


def test_ranks_split_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")  # what the deepspeed launcher sets for 2 ranks on this node
        assert share_cpu_threads() == max(1, (os.cpu_count() or 1) // 2)
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's choice is kept
        monkeypatch.setenv("LOCAL_SIZE", str(4 * (os.cpu_count() or 1)))
        assert share_cpu_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_SIZE", "1")  # one process: all cores, as torch chose
        assert share_cpu_threads() == before
    finally:
        torch.set_num_threads(before)
