"""Two DeepSpeed "nodes" on one machine: the multi-node launch a cluster user runs, one process per node.

Each node runs its own launcher, started independently (as `srun` starts one per node under Slurm):

    deepspeed --hostfile H --no_ssh --num_nodes 2 --num_gpus 1 --node_rank R \\
        --master_addr 127.0.0.1 --master_port P launch/sft.py --config demo.yaml artifact_dir=DIR ...

What DeepSpeed 0.19's launcher needs for that (deepspeed/launcher/runner.py, launch.py):
- a hostfile with one line per node, even with --no_ssh: without one the runner only knows
  `localhost` and refuses --num_nodes 2 ("Num nodes is >1 but no extra nodes available via
  hostfile"). With --no_ssh the host names are never contacted; they only fix the node order;
- --no_ssh with --node_rank R: the runner then starts the local launcher itself instead of pdsh;
- --master_addr: without it the runner would ask the first host for its address over ssh;
- --num_gpus 1: one process per node (CPU processes here). Ranks come out as node 0 -> RANK 0,
  node 1 -> RANK 1, WORLD_SIZE 2, LOCAL_RANK 0 and LOCAL_SIZE 1 on both, so DeepSpeed's
  shared-memory all-reduce stays off and the ranks talk over TCP (gloo), as on two machines.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import DEEPSPEED, DEMO, ENV, ROOT, manifest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TRAIN_ROWS, EVAL_ROWS, BATCH = 512, 32, 16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head(name: str, dst, n: int) -> str:
    lines = (ROOT / "reward_data" / "demo" / name).read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return str(dst)


@pytest.mark.parametrize("global_sizes", [False, True], ids=["per-process-batch", "global-batch"])
def test_sft_on_two_nodes(tmp_path, global_sizes):
    d = tmp_path / "shared"  # the artifact directory both nodes see
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    overrides = [
        f"artifact_dir={d}", "deepspeed.zero_stage=3", "wandb.mode=disabled",
        f"sft.train_data={_head('sft_train.jsonl', tmp_path / 'sft.jsonl', TRAIN_ROWS)}",
        f"sft.eval_data={_head('sft_eval.jsonl', tmp_path / 'sft_eval.jsonl', EVAL_ROWS)}",
        "sft.epochs=1", f"sft.batch_size={BATCH}", "sft.save_steps=8", "sft.logging_steps=4",
        f"deepspeed.global_batch_sizes={str(global_sizes).lower()}",
    ]
    port = _free_port()

    def launcher(node_rank: int) -> list[str]:
        return [*DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--num_gpus", "1",
                "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                str(ROOT / "launch" / "sft.py"), "--config", str(DEMO), *overrides]

    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = []
    for r, log in enumerate(logs):
        with log.open("w") as f:
            nodes.append(subprocess.Popen(launcher(r), cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.time() + 900
    try:
        for p in nodes:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in nodes:  # a node that failed or hung leaves the other waiting for it: stop both
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outs = [log.read_text() for log in logs]
    for r, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {r} exited {p.returncode}\n{out[-6000:]}"

    # each launcher started one process of a 2-process world, with rank = node rank
    for r, out in enumerate(outs):
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in out, out[-3000:]
        assert "dist_world_size=2" in out and "'--local_rank=0'" in out, out[-3000:]
    assert "global_rank_mapping=defaultdict(<class 'list'>, {'node0': [0], 'node1': [1]})" in outs[0]
    # rank 0 (node 0) reports the world; rank 1 prints no stage lines
    assert "2 process(es), ZeRO-3" in outs[0], outs[0][-3000:]
    assert "[sft] model:" not in outs[1], outs[1][-3000:]

    # one complete artifact, trained over 2 processes: per-process batches make a global batch of
    # 2 x BATCH and halve the steps; global batch sizes give each process BATCH / 2 and one process's steps
    m = manifest(d, "sft")
    assert m["status"] == "complete" and m["stage"] == "sft" and m["config"]["deepspeed"]["zero_stage"] == 3
    assert m["metrics"]["train_examples"] == TRAIN_ROWS
    assert m["metrics"]["train_steps"] == TRAIN_ROWS // (BATCH if global_sizes else 2 * BATCH)  # 32 in one process
    assert m["metrics"]["eval_loss"] < m["metrics"]["eval_loss_initial"]
    assert (d / "metrics" / "sft.jsonl").read_text().strip()  # rank 0 logged the run

    # no resumable state, staging or swapped-out directory left behind
    assert not (d / "checkpoints").exists() or not any((d / "checkpoints").rglob("*")), list((d / "checkpoints").rglob("*"))
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []

    # the published model loads as a plain checkpoint and runs
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "sft"))
    model = AutoModelForCausalLM.from_pretrained(str(d / "sft"), use_safetensors=True)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = torch.tensor([tok("list three animals:")["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
