"""The `rlhf` command: demo, pipeline, status, generate, report, bench."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf import artifacts

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "launch" / "configs" / "demo.yaml"
STAGE_SCRIPTS = {"sft": "sft.py", "reward": "rm.py", "ppo": "ppo.py"}


def _artifact_dir(config: str, overrides: list[str]) -> Path:
    from rlhf.config import load_config

    return Path(load_config(config, overrides).artifact_dir)


def run_pipeline(config: str, overrides: list[str]) -> int:
    """Each stage under the deepspeed launcher; the stage itself skips when up to date."""
    from rlhf.config import ConfigError

    try:
        art_dir = _artifact_dir(config, overrides)  # validates the config before anything starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs = art_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = os.environ.get("NUM_GPUS", "1")
    for stage, script in STAGE_SCRIPTS.items():
        cmd = ["deepspeed", "--master_port", os.environ.get("MASTER_PORT", "29500")]
        cmd += ["--hostfile", os.environ["HOSTFILE"]] if os.environ.get("HOSTFILE") else ["--num_gpus", n]
        cmd += [str(ROOT / "launch" / script), "--config", str(config), *overrides]
        log = logs / f"{stage}.log"
        print(f"== {stage}: {' '.join(cmd)}\n   log: {log}", flush=True)
        started = time.time()
        with log.open("a") as f:  # appended: an interrupted and a resumed run stay in one log
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            for line in proc.stdout:
                f.write(line)
                if line.startswith(f"[{stage}]") or "error" in line.lower() and line.startswith("["):
                    print("   " + line.rstrip(), flush=True)
            rc = proc.wait()
        if rc != 0:
            print(f"pipeline stopped: stage {stage} failed (exit {rc}) after {time.time() - started:.0f}s; "
                  f"see {log}", file=sys.stderr)
            return rc
    from rlhf import report

    out = report.build(art_dir)
    print(f"report: {out / 'index.html'}  (summary: {out / 'summary.json'})")
    return 0


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
            keys = {"sft": ["eval_loss_initial", "eval_loss"], "reward": ["eval_accuracy", "spearman_gold"],
                    "ppo": ["gold_score_sft", "gold_score_ppo", "kl_ppo_vs_sft", "win_rate_gold"]}[stage]
            figures = ", ".join(f"{k}={m['metrics'][k]:.4g}" for k in keys if isinstance(m["metrics"].get(k), (int, float)))
            runs = m.get("invocations", 1)
            line += f"  ({m.get('duration_s', 0):.0f}s{f' over {runs} runs' if runs > 1 else ''})  {figures}"
            if "files" not in m:
                line += "  (no file checksums: published by an older version)"
            elif args.verify:
                line += f"  ({len(m['files'])} files verified)"
        elif state == "damaged":
            damaged_any = True
            line += (f"  {'; '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}: the next stage will refuse it; "
                     f"rebuild with force=true ({artifacts.REBUILD[stage]})")
        elif state == "partial":
            point = artifacts.resume_point(d, stage)
            line += (f"  (resumable from {point}: re-run the same command to continue)" if point
                     else "  (started, no checkpoint yet: a re-run starts the stage over)")
            left = artifacts.leftovers(d, stage)
            if left:
                line += f"  (an interrupted publish left {', '.join(str(p) for p in left)}; the next run removes it)"
        print(line)
    return 1 if damaged_any else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from rlhf import models
    from rlhf.data import load_prompts, prompt_text, render_prompt
    from rlhf.generation import GREEDY, Sampling, generate_texts

    manifest = artifacts.read_manifest(args.model)
    if manifest is None or manifest.get("status") != "complete":
        print(f"error: {args.model} is not a complete artifact (no complete {artifacts.MANIFEST})", file=sys.stderr)
        return 2
    try:
        art = artifacts.load(args.model, manifest.get("stage"))
    except artifacts.ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, manifest["config"]["model"]["dtype"])
    use_template = art.use_chat_template
    prompts = load_prompts(args.prompts)
    texts = [render_prompt(tok, p, use_template) for p in prompts]
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.sample else GREEDY
    out = generate_texts(model, tok, texts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                         batch_size=args.batch_size, progress=True)
    with open(args.out, "w") as f:
        for p, r in zip(prompts, out):
            f.write(json.dumps({"prompt": prompt_text(p) if not isinstance(p, str) else p, "response": r}) + "\n")
    print(f"wrote {len(out)} responses to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf", description="Three-stage RLHF pipeline: SFT -> reward model -> PPO.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="run the whole pipeline on the built-in demo task (CPU is enough)")
    p.add_argument("--artifact-dir", default=None, help="where artifacts go (default: the demo config's)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides")
    p = sub.add_parser("pipeline", help="SFT -> RM -> PPO under the deepspeed launcher")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("status", help="each stage: complete / damaged / partial / missing, with key metrics")
    p.add_argument("--artifact-dir", required=True)
    p.add_argument("--verify", action="store_true",
                   help="also hash every published file against its manifest (sizes are always checked)")
    p = sub.add_parser("generate", help="responses of a published stage to a prompts file")
    p.add_argument("--model", required=True, help="a published stage directory, e.g. DIR/ppo")
    p.add_argument("--prompts", required=True, help="prompts file ({'prompt': ...} rows)")
    p.add_argument("--out", required=True, help="output .jsonl with {prompt, response} rows")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="with --sample: top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus (1.0 = off)")
    p.add_argument("--batch-size", type=int, default=64)
    p = sub.add_parser("bench", help="time PPO updates on a model at chosen sizes (episodes/s, tokens/s, "
                                     "seconds per phase, peak memory; --json)")
    from rlhf.bench import add_arguments

    add_arguments(p)
    p = sub.add_parser("report", help="(re)build DIR/report/ from DIR/metrics and the manifests")
    p.add_argument("--artifact-dir", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        overrides = list(args.overrides) + ([f"artifact_dir={Path(args.artifact_dir).resolve()}"] if args.artifact_dir else [])
        return run_pipeline(str(DEMO_CONFIG), overrides)
    if args.cmd == "pipeline":
        return run_pipeline(args.config, args.overrides)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "generate":
        return cmd_generate(args)
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
