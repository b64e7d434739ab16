#!/usr/bin/env python
"""Per-step times of ``dispatch="auto"`` (timed, no cost model) against fixed strategies (issue 13).

Under a launcher (``scripts/emulate_cluster ... -- scripts/bench_auto_steps.py hd2,auto,hd2,auto``):
for each configuration in order, a fresh patched copy of the README fine-tune model
(``qwen3_30b_a3b_mini_config``, 4 sequences x 128 tokens per rank, AdamW) trains ``--steps`` steps
on random tokens; a step's time is the slowest rank's. Splits the run into the first 6 steps (auto's
trial forwards on 2 levels) and the rest, so the trials' cost and any cost after the choice show
separately. Rank 0 prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", help="comma-separated strategies, run in this order (e.g. hd2,auto,hd2,auto)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="auto_steps.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    import hiermoe_hf
    from hiermoe_hf.tiny_models import build_model, qwen3_30b_a3b_mini_config

    rank, rows = dist.get_rank(), []
    for dispatch in args.configs.split(","):
        model = build_model(qwen3_30b_a3b_mini_config(), seed=0).train()
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(dispatch=dispatch))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(args.steps):
            ids = torch.randint(0, 256, (4, 128), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            hiermoe_hf.all_reduce_gradients(model)
            opt.step()
            opt.zero_grad()
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t))
        ran = sorted({v["strategy"] for v in hiermoe_hf.stats(model).values()})
        rows.append({"dispatch": dispatch, "ran_last": ran, "steps_s": times, "total_s": sum(times),
                     "first6_s": sum(times[:6]), "rest_median_ms": 1e3 * statistics.median(times[6:])})
    if rank == 0:
        print("| # | dispatch | runs after step 6 | total s | first 6 steps s | later steps, median ms |")
        print("|---|---|---|---|---|---|")
        for i, r in enumerate(rows):
            print(f"| {i} | {r['dispatch']} | {','.join(r['ran_last'])} | {r['total_s']:.2f} | {r['first6_s']:.2f} "
                  f"| {r['rest_median_ms']:.0f} |")
        with open(args.out, "w") as f:
            json.dump({"configs": args.configs, "steps": args.steps, "rows": rows}, f, indent=1)
            f.write("\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
