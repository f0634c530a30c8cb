"""The `rlhf` command: demo, pipeline, status, generate, report, compare, bench."""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rlhf import artifacts
from rlhf.metric_names import HEADLINE

from rlhf.install import DEMO_CONFIG, LAUNCH_DIR, demo_artifact_dir, install_hint

STAGE_LAUNCHERS = {"sft": "sft.sh", "reward": "rm.sh", "ppo": "ppo.sh"}  # launch/: what a user runs per stage
PYTHON_ENV = "RLHF_PYTHON"  # the interpreter launch/_stage.sh runs `-m deepspeed.launcher.runner` with


LAUNCHER_ENV = """\
environment (read by each stage's launcher, launch/_stage.sh):
  NUM_GPUS     processes per node: default every visible GPU (CUDA_VISIBLE_DEVICES limits them), 1 without GPUs
  HOSTFILE     a DeepSpeed hostfile for a multi-node run (the artifact directory on a shared filesystem)
  MASTER_PORT  the rendezvous port (default 29500); give concurrent runs different ones
  RLHF_PYTHON  the interpreter whose DeepSpeed runs the stages (default: the one running rlhf)"""

TAIL_LINES = 15         # lines shown of a failed stage's output that holds no traceback
TRACEBACK_LINES = 40    # most lines shown of a failed stage's traceback
KEPT_LINES = 400        # lines of a stage's output kept in memory for that
_TRACEBACK = "Traceback (most recent call last)"
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")


def _checked_config(config: str, overrides: list[str]) -> Any:
    """The pipeline config once everything checkable is checked for all three stages
    (rlhf.preflight), or None after printing what is wrong."""
    from rlhf import preflight
    from rlhf.artifacts import ArtifactError
    from rlhf.config import ConfigError, load_config
    from rlhf.data import DataError

    try:
        cfg = load_config(config, overrides)
        preflight.check(cfg, artifacts.STAGES)
    except (ConfigError, DataError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return cfg


def run_pipeline(config: str, overrides: list[str]) -> int:
    """Each stage under the deepspeed launcher; the stage itself skips when up to date. Bad input
    stops the pipeline before the first stage starts (rlhf.preflight). The driver holds the
    artifact directory's lock throughout; its stages inherit it (rlhf.locking)."""
    from rlhf.artifacts import ArtifactError
    from rlhf.locking import DirLock

    cfg = _checked_config(config, overrides)
    if cfg is None:
        return 2
    # the stages run this interpreter's DeepSpeed (_stage_env); find_spec imports nothing
    if importlib.util.find_spec("deepspeed") is None:
        print(f"error: DeepSpeed is not installed for {sys.executable}, which runs the stages; install it with "
              f"{install_hint('deepspeed')}", file=sys.stderr)
        return 2
    art_dir = Path(cfg.artifact_dir)
    lock = DirLock(art_dir, "rlhf pipeline")
    try:
        lock.acquire()
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rlhf.stage_io import Stopped, stop_on_signals

    stop_on_signals()  # SIGTERM/SIGHUP: the running stage is stopped, then the lock released (_run_stage)
    try:
        for stage, launcher in STAGE_LAUNCHERS.items():
            cmd = _stage_command(launcher, config, overrides, lock.token)
            log = art_dir / "logs" / f"{stage}.log"
            print(f"== {stage}: {' '.join(cmd)}\n   log: {log}", flush=True)
            started = time.time()
            output = StageOutput(stage, log)
            try:
                rc = _run_stage(cmd, output)
            except (Stopped, KeyboardInterrupt) as e:
                name = str(e) if isinstance(e, Stopped) else "SIGINT"
                print(f"stopped by {name} during the {stage} stage: nothing of it was published; re-run the same "
                      f"command to go on (`rlhf status --artifact-dir {art_dir}` says from where)", file=sys.stderr)
                return 128 + (e.signum if isinstance(e, Stopped) else 2)
            if rc != 0:
                _report_failure(output, rc, time.time() - started)
                return rc
        from rlhf import report

        try:
            out = report.build(art_dir)
        except OSError as e:
            print(f"error: the stages are complete, but writing the report into {art_dir / 'report'} failed "
                  f"({e.strerror or e}); free space and run `rlhf report --artifact-dir {art_dir}`", file=sys.stderr)
            return 1
    finally:
        lock.release()
    print(f"report: {out / 'index.html'}  (summary: {out / 'summary.json'})")
    return 0


def _stage_command(launcher: str, config: str, overrides: list[str], lock_token: str) -> list[str]:
    """One stage, started exactly as a user starts it by hand: `bash launch/<stage>.sh`, whose
    launch/_stage.sh is the one place the deepspeed command is built (NUM_GPUS, HOSTFILE,
    MASTER_PORT), with the interpreter _stage_env names. --lock-token lets the stage's rank 0 use the
    driver's lock, on any node."""
    return ["bash", str(LAUNCH_DIR / launcher), str(config), "--lock-token", lock_token, *overrides]


def _stage_env() -> dict[str, str]:
    """The stages' environment: the driver's own interpreter (whose DeepSpeed run_pipeline checked)
    runs the launcher and its ranks, whatever PATH holds or RLHF_PYTHON said, so an environment
    that is not activated works and a `deepspeed` script on PATH from another one is never used."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", PYTHON_ENV: sys.executable}


def _run_stage(cmd: list[str], output: "StageOutput") -> int:
    """Run one stage's command, passing every line of its output to `output`; its exit code."""
    output.write_log(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(cmd)}\n")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=_stage_env())
    except OSError as e:
        output.close()
        print(f"error: cannot start {cmd[0]} ({e.strerror or e}); the stage launchers (launch/*.sh) need bash "
              "on PATH", file=sys.stderr)
        return 2
    try:
        with proc.stdout:
            for line in proc.stdout:
                output.add(line)
        rc = proc.wait()
    except BaseException:  # a stop signal (rlhf.stage_io.Stopped, Ctrl-C): the stage stops first
        _stop_stage(proc, output)
        raise
    finally:
        output.close()
    return rc


def _stop_stage(proc: subprocess.Popen, output: "StageOutput") -> None:
    """SIGTERM to a stage's launcher (launch/_stage.sh passes it to every process of the stage and
    kills what remains after RLHF_STOP_GRACE seconds); wait for it, its last lines kept."""
    import signal

    grace = float(os.environ.get("RLHF_STOP_GRACE") or 20)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass
    try:
        for line in proc.stdout or ():
            output.add(line)
    except (OSError, ValueError):
        pass


# a tqdm progress bar's text: "[desc: ] 45%|####  | 108/240 [00:12<00:15, 8.1it/s, kl=2.1, score=0.9]"
_BAR = re.compile(r"^(?:(?P<desc>[^|]*?):\s*)?\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
                  r"\[(?P<elapsed>[\d:]+)<(?P<left>[\d:?]+)(?:,\s*(?P<rate>[^,\]]*))?(?:,\s*(?P<post>[^\]]*))?\]")
PROGRESS_STEP = 10       # percent between progress lines on a console that is not a terminal
PROGRESS_EVERY_S = 60.0  # ... or seconds, whichever comes first


class Progress:
    """One line of progress for a stage's main loop, made from the tqdm bars in its output: the bar
    of the stage's training loop (iterations, not data-preparation bars counting examples; the
    largest total seen, so an evaluation bar inside it does not take over). On a terminal the line
    is redrawn in place; elsewhere (a CI log, a file) it is printed every PROGRESS_STEP percent or
    PROGRESS_EVERY_S seconds."""

    def __init__(self, stage: str, live: bool | None = None, clock: Any = time.monotonic):
        self.stage, self.clock = stage, clock
        self.live = sys.stdout.isatty() if live is None else live
        self.total = 0
        self.shown = False        # a live line is on the screen
        self.last_pct, self.last_t = -PROGRESS_STEP, None

    def feed(self, line: str) -> bool:
        """Take a line of the stage's output; True when it was a progress bar's."""
        m = _BAR.search(line.strip())
        if m is None:
            return False
        rate, desc = m["rate"] or "", (m["desc"] or "").strip()
        if not (rate.endswith("it/s") or rate.endswith("s/it") or rate == "") or desc not in ("", self.stage):
            return True  # a data-preparation bar (examples/s, a description): not the stage's loop
        n, total = int(m["n"]), int(m["total"])
        if total < self.total:
            return True
        self.total = total
        pct = 100 * n // max(total, 1)
        text = f"[{self.stage}] {pct}% ({n}/{total}), {m['elapsed']} elapsed"
        if m["left"] != "?" and n < total:
            text += f", ~{m['left']} left"
        if m["post"]:
            text += f" ({m['post']})"
        now = self.clock()
        if self.live:
            print("\r\033[K   " + text, end="", flush=True)
            self.shown = True
        elif pct >= self.last_pct + PROGRESS_STEP or (n == total and self.last_pct < 100) or (
                self.last_t is not None and now - self.last_t >= PROGRESS_EVERY_S):
            print("   " + text, flush=True)
            self.last_pct, self.last_t = pct, now
        if self.last_t is None:
            self.last_t = now
        return True

    def clear(self) -> None:
        """Take the live line off the screen before another line is printed."""
        if self.shown:
            print("\r\033[K", end="", flush=True)
            self.shown = False


class StageOutput:
    """A stage's output as the pipeline driver handles it: appended to DIR/logs/<stage>.log (an
    interrupted and a resumed run stay in one log); the stage's own `[<stage>] ...` lines and error
    lines echoed to the console, with one line of progress (Progress); the last KEPT_LINES kept
    for a failure report. When the log cannot be written (disk full, a read-only directory, ...)
    that is said once, and from then on every line goes to the console instead, so nothing the
    stage says is lost."""

    def __init__(self, stage: str, log_path: Path, live: bool | None = None):
        self.stage, self.log_path = stage, log_path
        self.lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self.said_error = False   # the stage printed its own "[<stage>] error: ..." line
        self.log_failed = False
        self.progress = Progress(stage, live)
        self._file = None
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = log_path.open("a", encoding="utf-8", buffering=1)  # line-buffered: failures show at once
        except OSError as e:
            self._lose_log(e)

    def write_log(self, text: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(text)
        except OSError as e:
            self._lose_log(e)

    def add(self, line: str) -> None:
        line = line.rstrip("\n")
        self.lines.append(line)
        self.write_log(line + "\n")
        own = line.startswith(f"[{self.stage}]")
        self.said_error |= own and " error: " in line
        if not self.log_failed and self.progress.feed(line):
            return
        if self.log_failed or own or (line.startswith("[") and "error" in line.lower() and not _RANK_PREFIX.match(line)):
            self.progress.clear()
            print("   " + line.rstrip(), flush=True)

    def close(self) -> None:
        self.progress.clear()
        self._close_log()

    def _close_log(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self._lose_log(e)
            self._file = None

    def _lose_log(self, error: OSError) -> None:
        if not self.log_failed:
            print(f"warning: cannot write the {self.stage} log {self.log_path} ({error.strerror or error}); "
                  f"the rest of the {self.stage} output is shown here instead", file=sys.stderr, flush=True)
        self.log_failed = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the data it still held is lost with the log; the console has it
            self._file = None


def failure_excerpt(lines: list[str]) -> tuple[list[str], bool]:
    """(the useful end of a failed stage's output, whether it is a traceback): rank 0's last
    traceback (or the last traceback of the whole output when rank 0 printed none), at most
    TRACEBACK_LINES lines with its head and end kept; without a traceback, the last TAIL_LINES lines."""
    rank0 = [ln for ln in lines if ln.startswith("[rank0]:")]
    stream = rank0 if any(_TRACEBACK in ln for ln in rank0) else lines
    starts = [i for i, ln in enumerate(stream) if _TRACEBACK in ln]
    if not starts:
        return lines[-TAIL_LINES:], False
    tb = stream[starts[-1]:]
    if len(tb) > TRACEBACK_LINES:
        tb = tb[:1] + [f"... ({len(tb) - TRACEBACK_LINES + 1} lines left out)"] + tb[-(TRACEBACK_LINES - 2):]
    return tb, True


def _report_failure(output: StageOutput, rc: int, seconds: float) -> None:
    print(f"pipeline stopped: stage {output.stage} failed (exit {rc}) after {seconds:.0f}s", file=sys.stderr)
    excerpt, is_traceback = failure_excerpt(list(output.lines))
    if output.log_failed:  # every line since the log failed is on the console already
        print(f"its output is above ({output.log_path} could not be written)", file=sys.stderr)
        return
    if excerpt and (is_traceback or not output.said_error):
        print(f"--- {'its traceback' if is_traceback else 'the end of its output'}:", file=sys.stderr)
        for line in excerpt:
            print("   " + line, file=sys.stderr)
    print(f"full output: {output.log_path}", file=sys.stderr, flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    """One line per stage; exit 1 when a published artifact is damaged."""
    d = Path(args.artifact_dir)
    damaged_any = False
    for stage in artifacts.STAGES:
        state = artifacts.stage_state(d, stage)
        m = artifacts.read_manifest(artifacts.stage_dir(d, stage))
        damaged = []
        if state in ("complete", "damaged"):
            damaged = artifacts.damaged_files(artifacts.stage_dir(d, stage), m, hashes=args.verify)
            state = "damaged" if damaged else state
        line = f"{stage:7s} {state}"
        if state == "complete":
            figures = ", ".join(f"{k}={m['metrics'][k]:.4g}" for k in HEADLINE[stage]
                                if isinstance(m["metrics"].get(k), (int, float)))
            runs = m.get("invocations", 1)
            line += f"  ({m.get('duration_s', 0):.0f}s{f' over {runs} runs' if runs > 1 else ''})  {figures}"
            if m.get("imported"):
                line += f"  {artifacts.origin(m)}"
            if args.verify:
                line += f"  ({len(m['files'])} files verified)"
            metrics = m["metrics"]
            if metrics.get("selected_update") is not None and metrics.get("guard_reason"):
                line += f"\n        published update {metrics['selected_update']}: {metrics['guard_reason']}"
            line += "".join(f"\n        warning: {w}" for w in metrics.get("warnings") or [])
        elif state == "damaged":
            damaged_any = True
            line += (f"  {'; '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}: the next stage will refuse it; "
                     f"rebuild with force=true ({artifacts.REBUILD[stage]})")
        elif state == "partial":
            point = artifacts.resume_point(d, stage)
            bad = artifacts.damaged_checkpoints(d, stage)
            line += (f"  (resumable from {point}: re-run the same command to continue)" if point
                     else "  (no usable checkpoint: a re-run starts the stage over)" if bad
                     else "  (started, no checkpoint yet: a re-run starts the stage over)")
            if bad:
                line += f"  (a re-run passes over the damaged checkpoint{'s' if len(bad) > 1 else ''} {'; '.join(bad)})"
            left = artifacts.leftovers(d, stage)
            if left:
                line += f"  (an interrupted publish left {', '.join(str(p) for p in left)}; the next run removes it)"
        print(line)
    return 1 if damaged_any else 0


def cmd_config(args: argparse.Namespace) -> int:
    """`rlhf config`: every key, its default and its help; `rlhf config CONFIG [k=v ...]`: each key's
    resolved value (as the stages will see it), marked where it differs from the default."""
    from rlhf.config import describe

    try:
        return _print_config(args, describe())
    except BrokenPipeError:  # `rlhf config | head`
        sys.stdout = open(os.devnull, "w")
        return 0


def _print_config(args: argparse.Namespace, rows: list) -> int:
    from rlhf.config import ConfigError, load_config

    if args.grep:
        rows = [r for r in rows if args.grep.lower() in r[0].lower()]
    if args.config is None:
        for key, default, help_text in rows:
            print(f"{key} = {default}\n    {help_text}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides).to_dict()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, default, _ in rows:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        mark = "" if repr(node) == default else "   # default " + default
        print(f"{key} = {json.dumps(node, default=str)}{mark}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from rlhf import dashboard

    mode = "online" if args.push else "offline" if args.offline else None
    return dashboard.run(Path(args.artifact_dir), project=args.project, entity=args.entity, mode=mode)


def cmd_compare(args: argparse.Namespace) -> int:
    """Several artifact directories' PPO runs on one over-optimisation chart (rlhf.compare)."""
    from rlhf import compare

    labels = args.labels.split(",") if args.labels is not None else None
    if labels is not None and len(labels) != len(args.dirs):
        print(f"error: --labels has {len(labels)} label(s) for {len(args.dirs)} director"
              f"{'y' if len(args.dirs) == 1 else 'ies'}: give one per directory, comma-separated, in the same order",
              file=sys.stderr)
        return 2
    try:
        compare.compare([Path(d) for d in args.dirs], Path(args.out), labels)
    except artifacts.ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


GENERATE_MAX_PROMPT_LENGTH = 512  # `rlhf generate` keeps the last this many tokens of a longer prompt


def cmd_generate(args: argparse.Namespace) -> int:
    from rlhf import distributed, engines, models
    from rlhf.data import DataError, load_prompts, prompt_text, render_prompt
    from rlhf.generation import GREEDY, Sampling, decode_responses

    manifest = artifacts.read_manifest(args.model)
    if manifest is None or manifest.get("status") != "complete":
        print(f"error: {args.model} is not a complete artifact (no complete {artifacts.MANIFEST})", file=sys.stderr)
        return 2
    if manifest.get("stage") == artifacts.REWARD:
        print(f"error: {args.model} is a reward model, which scores responses and cannot write them; generate from "
              f"the policy of the sft or ppo stage (e.g. --model {Path(args.model).parent / 'ppo'})", file=sys.stderr)
        return 2
    out_path = Path(args.out)
    if out_path.is_dir():
        print(f"error: --out {args.out} is a directory; give the .jsonl file to write (e.g. {out_path / 'responses.jsonl'})",
              file=sys.stderr)
        return 2
    try:
        engines.require(args.engine, f"--engine {args.engine}")
        art = artifacts.load(args.model, manifest.get("stage"))
        prompts = load_prompts(args.prompts)  # read before the model: a bad file fails at once
        out_path.parent.mkdir(parents=True, exist_ok=True)
        part = out_path.with_name(out_path.name + ".part")
        part.open("w").close()  # writable before any work; the responses go here, renamed when all are in
    except (artifacts.ArtifactError, DataError, engines.EngineUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    tok = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, manifest["config"]["model"]["dtype"]).to(distributed.device())
    use_template = art.use_chat_template
    texts = [render_prompt(tok, p, use_template) for p in prompts]
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.sample else GREEDY
    try:
        engine = engines.build(args.engine, model, tok, max_prompt_length=GENERATE_MAX_PROMPT_LENGTH,
                               device=distributed.device(), dtype=manifest["config"]["model"]["dtype"])
    except engines.EngineUnavailable as e:  # e.g. a model vLLM's CPU attention cannot run
        print(f"error: {e}", file=sys.stderr)
        return 2
    gens = engine.generate(texts, sampling, args.max_new_tokens, batch_size=args.batch_size, progress=True)
    engines.close(engine)
    out = [r for g in gens for r in decode_responses(tok, g)]
    try:
        with open(part, "w") as f:
            for p, r in zip(prompts, out):
                f.write(json.dumps({"prompt": prompt_text(p) if not isinstance(p, str) else p, "response": r}) + "\n")
        os.replace(part, out_path)
    except OSError as e:
        print(f"error: writing {args.out} failed ({e.strerror or e}); nothing was written there", file=sys.stderr)
        return 1
    print(f"wrote {len(out)} responses to {args.out}")
    return 0


def _number(kind: type, low: float, high: float | None = None, above: bool = False) -> Any:
    """An argparse type: a `kind` number >= low (> low with `above`) and <= high; anything else is a
    usage error naming the bounds (argparse adds the option's name)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or (value <= low if above else value < low) or (high is not None and value > high):
            bounds = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `rlhf status ... | head -1`: the reader has gone; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF pipeline: SFT -> reward model -> PPO.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="run the whole pipeline on the built-in demo task (CPU is enough)",
                       epilog=LAUNCHER_ENV, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact-dir", default=None, help="where artifacts go (default: artifacts/demo in the checkout, "
                                                        "or in the current directory when rlhf is installed)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides")
    p = sub.add_parser("pipeline", help="SFT -> RM -> PPO under the deepspeed launcher",
                       epilog=LAUNCHER_ENV, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("config", help="every config key with its default and meaning; with CONFIG, that config's "
                                      "values once resolved and checked (overrides applied, paths made absolute)")
    p.add_argument("config", nargs="?", default=None, help="a pipeline YAML (omit to list the keys)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--grep", default=None, help="only keys containing this text (e.g. kl)")
    p = sub.add_parser("plan", help="memory per process of each stage, estimated from a config before anything "
                                    "is launched (what is counted: the docstring of rlhf/plan.py)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--processes", type=int, default=None,
                   help="processes the stages will run on (default: NUM_GPUS, else every visible GPU, else 1: "
                        "what the launchers start)")
    p = sub.add_parser("status", help="each stage: complete / damaged / partial / missing, with key metrics")
    p.add_argument("--artifact-dir", required=True)
    p.add_argument("--verify", action="store_true",
                   help="also hash every published file against its manifest (sizes are always checked)")
    p = sub.add_parser("generate", help="responses of a published stage to a prompts file")
    p.add_argument("--model", required=True, help="a published stage directory, e.g. DIR/ppo")
    p.add_argument("--prompts", required=True, help="prompts file ({'prompt': ...} rows)")
    p.add_argument("--out", required=True, help="output .jsonl with {prompt, response} rows")
    p.add_argument("--max-new-tokens", type=_number(int, 1), default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_number(float, 0.0, above=True), default=1.0)
    p.add_argument("--top-k", type=_number(int, 0), default=0, help="with --sample: top-k (0 = off)")
    p.add_argument("--top-p", type=_number(float, 0.0, 1.0, above=True), default=1.0,
                   help="with --sample: nucleus (1.0 = off)")
    p.add_argument("--batch-size", type=_number(int, 1), default=64)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers generate(); vllm: a vLLM engine (installed separately, see the README)")
    p = sub.add_parser("bench", help="time PPO updates on a model at chosen sizes (episodes/s, tokens/s, "
                                     "seconds per phase, peak memory; --json)")
    from rlhf.bench import add_arguments

    add_arguments(p)
    p = sub.add_parser("report", help="(re)build DIR/report/ from DIR/metrics and the manifests")
    p.add_argument("--artifact-dir", required=True)
    p = sub.add_parser("compare", help="several artifact directories' PPO runs on one over-optimisation chart, "
                                       "with a table of their published policies and best-of-n")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="artifact directories with a published PPO stage (DIR/ppo)")
    p.add_argument("--out", default="compare.png", help="the chart (default: compare.png); the table's rows go beside "
                                                         "it as JSON (compare.json)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per DIR "
                                                  "(default: DIR's name, estimator and k)")
    p = sub.add_parser("dashboard", help="the pipeline's W&B workspace: written to DIR/report/wandb_workspace.json, "
                                         "created or updated in W&B when online")
    p.add_argument("--artifact-dir", required=True)
    p.add_argument("--project", default=None, help="W&B project (default: the config's wandb.project)")
    p.add_argument("--entity", default=None, help="W&B entity (default: the config's wandb.entity, else your default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--push", action="store_true", help="create or update the workspace in W&B (needs a login)")
    mode.add_argument("--offline", action="store_true", help="only write the definition, even when logged in")
    args = ap.parse_args(argv)
    if args.cmd == "dashboard":
        return cmd_dashboard(args)
    if args.cmd == "demo":
        art = Path(args.artifact_dir) if args.artifact_dir else demo_artifact_dir()
        overrides = list(args.overrides) + ([f"artifact_dir={art.resolve()}"] if art is not None else [])
        return run_pipeline(str(DEMO_CONFIG), overrides)
    if args.cmd == "pipeline":
        return run_pipeline(args.config, args.overrides)
    if args.cmd == "config":
        return cmd_config(args)
    if args.cmd == "plan":
        from rlhf import plan

        return plan.main(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "generate":
        return cmd_generate(args)
    if args.cmd == "compare":
        return cmd_compare(args)
    if args.cmd == "bench":
        from rlhf.bench import bench

        return bench(args)
    if args.cmd == "report":
        from rlhf import report

        out = report.build(Path(args.artifact_dir))
        print(f"report: {out / 'index.html'}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
