"""The pipeline driver's one line of progress per stage, made from the tqdm bars in a stage's output."""
from __future__ import annotations

from rlhf.cli import Progress, StageOutput

PPO = [f"ppo:  {p}%|##   | {n}/384 [00:{n // 10:02d}<01:47,  3.48it/s, kl=1.098, score=0.526]"
       for p, n in ((0, 1), (3, 10), (5, 20), (8, 30), (13, 50), (50, 192), (99, 380), (100, 384))]
PREP = ["Building labels for train dataset:  83%|########  | 2482/3000 [00:00<00:00, 22360.35 examples/s]",
        "Map: 100%|##########| 3000/3000 [00:00<00:00, 21580.37 examples/s]"]
TRAIN = [" 10%|#         | 117/1146 [00:15<02:30,  6.84it/s]",
         "100%|##########| 21/21 [00:01<00:00, 20.1it/s]",  # an evaluation inside training: smaller total
         " 27%|##7       | 307/1146 [00:35<01:43,  8.08it/s]"]


def test_progress_lines_every_ten_percent_off_a_terminal(capsys):
    p = Progress("ppo", live=False, clock=lambda: 0.0)
    assert all(p.feed(line) for line in PPO)
    out = capsys.readouterr().out.splitlines()
    assert out == ["   [ppo] 0% (1/384), 00:00 elapsed, ~01:47 left (kl=1.098, score=0.526)",
                   "   [ppo] 13% (50/384), 00:05 elapsed, ~01:47 left (kl=1.098, score=0.526)",
                   "   [ppo] 50% (192/384), 00:19 elapsed, ~01:47 left (kl=1.098, score=0.526)",
                   "   [ppo] 98% (380/384), 00:38 elapsed, ~01:47 left (kl=1.098, score=0.526)",
                   "   [ppo] 100% (384/384), 00:38 elapsed (kl=1.098, score=0.526)"]  # the end is always shown


def test_slow_progress_is_shown_every_minute(capsys):
    t = [0.0]
    p = Progress("ppo", live=False, clock=lambda: t[0])
    for i, line in enumerate(PPO[:4]):  # 0%, 3%, 5%, 8%: under ten percent apart, a minute apart from 3% on
        t[0] = 0.0 if i < 2 else 61.0 * (i - 1)
        p.feed(line)
    assert [ln.split(" (")[0] for ln in capsys.readouterr().out.splitlines()] == [
        "   [ppo] 0%", "   [ppo] 5%", "   [ppo] 7%"]


def test_data_preparation_and_evaluation_bars_are_not_the_stage_loop(capsys):
    p = Progress("sft", live=False, clock=lambda: 0.0)
    for line in PREP + TRAIN:
        assert p.feed(line)
    out = capsys.readouterr().out.splitlines()
    assert out == ["   [sft] 10% (117/1146), 00:15 elapsed, ~02:30 left",
                   "   [sft] 26% (307/1146), 00:35 elapsed, ~01:43 left"]
    assert not p.feed("[sft] model: 0.58M parameters")


def test_live_progress_redraws_one_line_and_clears_it_for_other_lines(tmp_path, capsys):
    out = StageOutput("ppo", tmp_path / "ppo.log", live=True)
    out.add(PPO[1] + "\n")
    out.add(PPO[2] + "\n")
    out.add("[ppo] best-of-n baseline: n=1 ...\n")
    out.add("some library warning\n")
    out.close()
    shown = capsys.readouterr().out
    assert shown.count("\r\033[K   [ppo] 2% (10/384)") == 1 and shown.count("\r\033[K   [ppo] 5% (20/384)") == 1
    assert shown.endswith("\r\033[K   [ppo] best-of-n baseline: n=1 ...\n")  # the live line cleared first
    assert shown.index("(20/384)") < shown.index("\r\033[K", shown.index("(20/384)")) < shown.index("best-of-n")
    assert "library warning" not in shown
    log = (tmp_path / "ppo.log").read_text()
    assert PPO[1] in log and "library warning" in log  # the log keeps every line
