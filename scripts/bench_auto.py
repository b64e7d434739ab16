#!/usr/bin/env python3
"""Does ``--dispatch auto`` run the fastest strategy out of the box? (issue 13 item 6)

Runs the README's fine-tuning example (``examples/finetune.py --max-steps N``) on the emulated
cluster (``scripts/emulate_cluster``: 2 nodes x 2 ranks, one process group per run) for every
configuration at every link rate, the configurations interleaved in each repetition so they share
the machine's conditions (every other repetition in reverse order), and reads the summary's
throughput and strategies. ``--old-repo`` adds the same example from another checkout (e.g. the
commit before a change) to the same run. Prints a table per rate and writes every run to ``--out``
(JSON). Needs root (network namespaces).

    sudo .venv/bin/python scripts/bench_auto.py --rates 200mbit,1gbit --reps 3 --old-repo /tmp/old \
        --out docs/auto_benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = {
    "tokens_per_s": re.compile(r"throughput\s*\|\s*([\d,]+) tokens/s"),
    "strategies": re.compile(r"strategies \(layer forwards\)\s*\|\s*(.+)$", re.M),
}
CHUNKS = re.compile(r"overlap chunks \(last step\)\s*\|\s*(.+)$", re.M)  # absent before issue 18


def run_once(repo: str, config: str, rate: str, steps: int, port: int, python: str) -> dict:
    """One fine-tune on the emulated cluster; its summary's throughput and strategies. ``config``:
    a strategy, or ``STRATEGY:COST_MODEL`` (e.g. ``auto:calibrate``, given as HIERMOE_COST_MODEL)."""
    dispatch, _, cost_model = config.partition(":")
    with tempfile.TemporaryDirectory(prefix="bench_auto_") as out_dir:
        cmd = [
            os.path.join(REPO, "scripts", "emulate_cluster"), "--nodes", "2", "--ranks-per-node", "2",
            "--rate", rate, "--port", str(port), "--python", python, "--",
            os.path.join(repo, "examples", "finetune.py"), "--max-steps", str(steps), "--dispatch", dispatch,
            "--output-dir", out_dir,
        ]
        env = dict(os.environ, PYTHONPATH=repo, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        if cost_model:
            env["HIERMOE_COST_MODEL"] = cost_model
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    found = {k: rx.search(text) for k, rx in SUMMARY.items()}
    if not all(found.values()):
        raise RuntimeError(f"no summary in the output of {' '.join(cmd)}:\n{text[-3000:]}")
    return {
        "tokens_per_s": int(found["tokens_per_s"].group(1).replace(",", "")),
        "strategies": found["strategies"].group(1).strip()
        + (f" x{m.group(1).strip()}" if (m := CHUNKS.search(text)) else ""),
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="200mbit,1gbit", help="comma-separated tc rates")
    p.add_argument("--dispatch", default="auto,hd1,hd2",
                   help="comma-separated configurations of this checkout: a strategy, or STRATEGY:COST_MODEL "
                        "(e.g. auto:calibrate)")
    p.add_argument("--old-repo", default=None, help="another checkout whose `auto` runs in the same repetitions")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="--max-steps of the fine-tune (README: 30)")
    p.add_argument("--port", type=int, default=29870)
    p.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"))
    p.add_argument("--out", default="auto_benchmark.json")
    args = p.parse_args(argv)
    configs = [("new", REPO, d) for d in args.dispatch.split(",")]
    if args.old_repo:
        configs.append(("old", os.path.abspath(args.old_repo), "auto"))
    runs = []
    for rate in args.rates.split(","):
        for rep in range(args.reps):
            # every other repetition in reverse: no configuration always runs first (or after another)
            for label, repo, dispatch in configs if rep % 2 == 0 else configs[::-1]:
                r = run_once(repo, dispatch, rate, args.steps, args.port, args.python)
                r.update(rate=rate, rep=rep, code=label, dispatch=dispatch)
                runs.append(r)
                print(f"{rate} rep {rep} {label} {dispatch}: {r['tokens_per_s']:,} tokens/s ({r['strategies']})",
                      file=sys.stderr, flush=True)
    table = []
    for rate in args.rates.split(","):
        print(f"\n## {rate}: tokens/s per repetition (median), fine-tune --max-steps {args.steps}\n")
        print("| code | dispatch | strategies run (last repetition) | tokens/s | median |")
        print("|---|---|---|---|---|")
        for label, _, dispatch in configs:
            mine = [r for r in runs if r["rate"] == rate and r["code"] == label and r["dispatch"] == dispatch]
            tps = [r["tokens_per_s"] for r in mine]
            med = statistics.median(tps)
            table.append({"rate": rate, "code": label, "dispatch": dispatch, "median_tokens_per_s": med})
            runs_text = ", ".join(f"{t:,}" for t in tps)
            print(f"| {label} | {dispatch} | {mine[-1]['strategies']} | {runs_text} | {med:,.0f} |")
    with open(args.out, "w") as f:
        json.dump({"argv": sys.argv[1:], "steps": args.steps, "runs": runs, "medians": table}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
