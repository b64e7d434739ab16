"""Per-GPU memory of full fine-tuning Qwen3-30B-A3B and DeepSeek-V3 with AdamW in bf16 (the planner's model).

    python scripts/memory_table.py            # prints the markdown table, writes docs/memory_table.json

Topologies 2x8, 4x8, 8x8 and 32x8 GPUs of 80 GiB; dense part replicated (DDP) or sharded (FSDP2);
sequence 4096, micro-batch 1, gradient checkpointing on (the "without" column adds its absence).
"""

from __future__ import annotations

import json
import os

from hiermoe_hf.cost import memory

TOPOLOGIES = ((2, 8), (4, 8), (8, 8), (32, 8))
GIB = 2**30


def rows() -> list[dict]:
    out = []
    for name in ("qwen3-30b-a3b", "deepseek-v3"):
        config = memory.load_config(name)
        table = memory.ParamTable.of(config)
        for nodes, gpus in TOPOLOGIES:
            if table.num_experts % (nodes * gpus):
                out.append({"model": name, "topology": f"{nodes}x{gpus}", "note": (
                    f"{table.num_experts} experts do not split over {nodes * gpus} ranks (needs expert-parallel "
                    "groups, ep_size)")})
                continue
            for sharding in memory.DENSE_SHARDINGS:
                plans = {
                    ckpt: memory.memory_plan(config, nodes * gpus, dense_sharding=sharding, gradient_checkpointing=ckpt,
                                             table=table)
                    for ckpt in (True, False)
                }
                out.append({"model": name, "topology": f"{nodes}x{gpus}", "dense_sharding": sharding,
                            "with_checkpointing": plans[True], "without_checkpointing": plans[False]})
    return out


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | GPUs | dense | dense params | expert params | grads | AdamW | activations (ckpt) | total (ckpt) "
        "| fits 80 GiB | total without ckpt |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "note" in r:
            lines.append(f"| {r['model']} | {r['topology']} | - | {r['note']} |||||||")
            continue
        p, q = r["with_checkpointing"], r["without_checkpointing"]
        g = [p[k] / GIB for k in ("dense_params_bytes", "expert_params_bytes", "grads_bytes", "optimizer_bytes",
                                   "activations_bytes", "total_bytes")]
        lines.append(
            f"| {r['model']} | {r['topology']} | {r['dense_sharding']} | " + " | ".join(f"{v:.1f}" for v in g)
            + f" | {'yes' if p['fits'] else 'no'} | {q['total_bytes'] / GIB:.1f} ({'fits' if q['fits'] else 'no'}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    results = rows()
    print(markdown(results))
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "memory_table.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
