"""Weight checksums, truthful totals after a resume, leftovers of an interrupted publish,
and resuming on another number of processes."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from rlhf import artifacts as A
from rlhf.artifacts import MANIFEST, REWARD, SFT, ArtifactError
from rlhf.hf_training import logged_train_loss
from rlhf.tracking import Tracker, read_metrics

from test_artifacts import config, publish


# ---------------------------------------------------------------- checksums

def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    art = publish(tmp_path, SFT, text="abc")
    files = art.manifest["files"]
    assert files == {"model.safetensors": {
        "bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}}
    on_disk = json.loads((tmp_path / "sft" / MANIFEST).read_text())
    assert on_disk["files"] == files


def test_truncated_weights_are_damaged_everywhere(tmp_path):
    publish(tmp_path, SFT, text="weights" * 100)
    cfg = config()
    assert A.is_up_to_date(tmp_path, SFT, cfg, [])
    os.truncate(tmp_path / "sft" / "model.safetensors", 50)
    assert A.stage_state(tmp_path, SFT) == "damaged"
    assert not A.is_up_to_date(tmp_path, SFT, cfg, [])  # a re-run rebuilds it instead of skipping
    with pytest.raises(ArtifactError) as e:
        A.load(tmp_path / "sft", SFT)
    msg = str(e.value)
    assert "sft artifact" in msg and "model.safetensors" in msg and "50 bytes" in msg and "700" in msg
    assert "force=true" in msg


def test_changed_bytes_of_the_same_size_are_caught_by_the_hash(tmp_path):
    publish(tmp_path, SFT, text="weights")
    f = tmp_path / "sft" / "model.safetensors"
    f.write_text("weightZ")
    assert A.stage_state(tmp_path, SFT) == "complete"  # sizes only: what status checks by default
    assert A.damaged_files(tmp_path / "sft", A.read_manifest(tmp_path / "sft"), hashes=True)
    with pytest.raises(ArtifactError, match="sha256"):
        A.load(tmp_path / "sft", SFT)
    A.load(tmp_path / "sft", SFT, verify=False)  # callers that checked already


def test_missing_file_and_old_manifests(tmp_path):
    publish(tmp_path, SFT)
    (tmp_path / "sft" / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        A.load(tmp_path / "sft", SFT)



def test_an_edited_manifest_cannot_switch_the_checks_off(tmp_path):
    """Removing a file's entry (or the whole list) from the manifest, then the file itself, does
    not make a damaged artifact pass: the list carries its own digest, and no list is no proof."""
    def edit(change) -> None:
        publish(tmp_path, REWARD)
        m = json.loads((tmp_path / "reward" / MANIFEST).read_text())
        change(m)
        (tmp_path / "reward" / MANIFEST).write_text(json.dumps(m))
        (tmp_path / "reward" / "model.safetensors").unlink()

    edit(lambda m: m["files"].pop("model.safetensors"))
    with pytest.raises(ArtifactError, match="file list was changed after the publish"):
        A.load(tmp_path / "reward", REWARD)
    assert A.stage_state(tmp_path, REWARD) == "damaged"
    edit(lambda m: m.pop("files"))
    with pytest.raises(ArtifactError, match="lists no files with checksums"):
        A.load(tmp_path / "reward", REWARD)
    assert A.stage_state(tmp_path, REWARD) == "damaged"

    def recomputed(m: dict) -> None:  # the list and its digest both rewritten, without the weights
        m["files"].pop("model.safetensors")
        m["files_sha256"] = A.files_digest(m["files"])
    edit(recomputed)
    with pytest.raises(ArtifactError, match="lists no model weights"):
        A.load(tmp_path / "reward", REWARD)


# ---------------------------------------------------------------- interrupted publish

def test_leftover_staging_dir_is_reported(tmp_path):
    assert A.stage_state(tmp_path, SFT) == "missing"
    (A.staging_dir(tmp_path, SFT)).mkdir(parents=True)
    assert A.leftovers(tmp_path, SFT) == [A.staging_dir(tmp_path, SFT)]
    assert A.stage_state(tmp_path, SFT) == "partial"
    (tmp_path / ".sft.old-123").mkdir()
    assert len(A.leftovers(tmp_path, SFT)) == 2


# ---------------------------------------------------------------- totals across invocations

def test_stage_clock_sums_invocations(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "process_started", lambda: None)
    c1 = A.StageClock(tmp_path, started=time.time() - 100)
    c1.tick(force=True)
    assert c1.count() == 1
    c2 = A.StageClock(tmp_path, started=time.time() - 30)  # the run after a kill
    assert c2.count() == 2
    assert 129 < c2.total() < 135
    c2.tick()                       # throttled: the first tick writes, the next within a second does not
    c2.tick()
    assert json.loads((tmp_path / "clock.json").read_text())["seconds"][0] == pytest.approx(100, abs=1)
    assert A.StageClock(tmp_path, started=time.time(), enabled=False).earlier  # reads, never writes


def test_manifest_duration_covers_every_invocation(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "process_started", lambda: None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    A.StageClock(ckpt, started=time.time() - 200).tick(force=True)
    clock = A.StageClock(ckpt, started=time.time() - 1)
    m = A.build_manifest(SFT, config(), [], {}, data={}, metrics={}, clock=clock)
    assert m["duration_s"] >= 200 and m["invocations"] == 2


def test_logged_train_loss_by_hand():
    # logs every 2 steps, a last log covering 1 step: (2*1.0 + 2*0.5 + 1*0.2) / 5
    history = [{"loss": 1.0, "step": 2}, {"loss": 0.5, "step": 4}, {"eval_loss": 9.0, "step": 4},
               {"loss": 0.2, "step": 5}, {"train_loss": 0.0, "train_runtime": 1.0, "step": 5}]
    assert logged_train_loss(history) == pytest.approx(3.2 / 5)
    assert logged_train_loss([]) is None


def _wandb_off():
    return SimpleNamespace(mode="disabled", project="p", entity=None)


def test_resumed_tracker_drops_rows_after_the_checkpoint_and_end_of_run_rows(tmp_path):
    t = Tracker(tmp_path, SFT, "run", {}, _wandb_off())
    for step in (10, 20, 30):
        t.log({"train/loss": 1.0 / step}, step=step)
    t.log({"train_loss": 0.1, "train_runtime": 5.0}, step=30, summary=True)
    with t.path.open("a") as f:
        f.write('{"step": 31, "train/lo')  # a line cut short by the kill
    r = Tracker(tmp_path, SFT, "run", {}, _wandb_off(), resume_step=20)
    r.log({"train/loss": 0.03}, step=30)
    r.log({"train_loss": 0.2, "train_runtime": 9.0}, step=30, summary=True)
    rows = read_metrics(tmp_path, SFT)
    assert [row["step"] for row in rows] == [10, 20, 30, 30]
    assert sum(bool(row.get("summary")) for row in rows) == 1 and rows[-1]["train_loss"] == 0.2


# ---------------------------------------------------------------- another number of processes

def test_resume_on_another_number_of_processes_is_refused_with_how_to_go_on(tmp_path):
    cfg = config()
    ckpt, resuming = A.prepare_checkpoints(tmp_path, SFT, cfg, processes=2)
    assert not resuming
    A.prepare_checkpoints(tmp_path, SFT, cfg, processes=1)  # nothing resumable yet: fine
    A.prepare_checkpoints(tmp_path, SFT, cfg, processes=2)
    (ckpt / "checkpoint-40").mkdir()
    (ckpt / "checkpoint-40" / "trainer_state.json").write_text("{}")
    p = ckpt / "checkpoint-40"
    A.write_durably(p / A.CKPT_SEAL, json.dumps({"files": A.seal(p, [p])}))  # a checkpoint a resume trusts
    with pytest.raises(ArtifactError) as e:
        A.prepare_checkpoints(tmp_path, SFT, cfg, processes=1)
    msg = str(e.value)
    assert "2 process(es)" in msg and "this run has 1" in msg and "--num_gpus 2" in msg and "step 40" in msg
    assert str(ckpt) in msg and (ckpt / "checkpoint-40").is_dir()  # nothing was thrown away
    assert A.prepare_checkpoints(tmp_path, SFT, cfg, processes=2)[1]  # the same count resumes


def test_clock_counts_from_the_process_start():
    started = A.process_started()
    assert started is not None and started <= time.time()
    assert A.StageClock(None, started=time.time()).started == pytest.approx(started, abs=0.05)
