"""Fine-tune a Hugging Face MoE model with HierMoE expert parallelism in an Accelerate loop.

    accelerate launch --config_file examples/accelerate_configs/cpu_4proc.yaml examples/finetune.py \\
        --topology 2x2 --max-steps 100 --output-dir outputs/finetune

With no --model/--dataset it runs offline anywhere: an embedded Qwen3-MoE shaped like Qwen3-30B-A3B
at toy size, a byte-level tokenizer and a corpus of Python standard-library docstrings. On a machine
without GPUs it picks CPU/gloo itself. It shows a progress bar (loss, tokens/s, inter-node bytes
saved vs a2a, strategies), prints a summary table and writes a checkpoint that plain
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

import hiermoe_hf
from hiermoe_hf.accelerate import HierMoEPlugin
from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.tiny_data import builtin_corpus, byte_tokenizer, pack_blocks
from hiermoe_hf.tiny_models import build_model, qwen3_30b_a3b_mini_config

DEFAULT_MODEL = "embedded Qwen3-30B-A3B-shaped mini (hiermoe_hf.tiny_models.qwen3_30b_a3b_mini_config)"
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="Hub name or local folder; default: " + DEFAULT_MODEL)
    p.add_argument("--dataset", default=None,
                   help="a datasets Hub name, or local files/folder (.txt, .json/.jsonl, .csv, .parquet);\n"
                        "default: Python standard-library docstrings, built at run time")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--dispatch", default=None, help="auto | a2a | 2dh | hd1 .. hdD (default: HIERMOE_DISPATCH or auto)")
    p.add_argument("--topology", default=None, help="e.g. 2x2 (default: HIERMOE_TOPOLOGY or nodes x procs per node)")
    p.add_argument("--swap-interval", type=int, default=None, help="optimizer steps between expert swaps; 0 = never")
    p.add_argument("--dense-sharding", default=None, choices=["ddp", "fsdp2"],
                   help="dense part replicated (ddp) or sharded with FSDP2 (default: HIERMOE_DENSE_SHARDING or ddp)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                   help="bf16: forward and backward under autocast (fp32 weights, bf16 rows on the wire)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--output-dir", default="outputs/finetune")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process and step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def log0(accelerator: Accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, flush=True)


def _tokenizer_or_none(name: str):
    """The checkpoint's tokenizer, or None when it has none: a folder without tokenizer files raises, or
    (Transformers 5.24, e.g. OLMoE) yields an empty tokenizer of the family's class that encodes nothing."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None
    return tokenizer if tokenizer("hello world")["input_ids"] else None


def load_model_and_tokenizer(args, plugin: HierMoEPlugin, accelerator: Accelerator):
    """The default tiny model, or --model through hiermoe_hf.from_pretrained (only this rank's experts)."""
    if args.model is None:
        return build_model(qwen3_30b_a3b_mini_config(), seed=args.seed).train(), byte_tokenizer()
    cfg = plugin.config(plugin.resolve_topology(accelerator.num_processes))
    try:
        # With FSDP2 each rank reads only its chunks of the dense part, and only its experts.
        model = hiermoe_hf.from_pretrained(args.model, cfg, dense_sharding=plugin.dense_sharding)
    except (OSError, ValueError) as err:  # missing folder, malformed name, or a Hub name with no network
        raise SystemExit(f"finetune: cannot load --model {args.model!r}: {err}\n"
                         "Without network access pass a local folder (a save_pretrained checkpoint).") from None
    tokenizer = _tokenizer_or_none(args.model)
    if tokenizer is None:
        if model.config.get_text_config().vocab_size < 256:  # an image-text config keeps it in text_config
            raise SystemExit(f"finetune: {args.model!r} has no tokenizer, and too few ids for bytes") from None
        log0(accelerator, f"finetune: {args.model!r} has no tokenizer; using the byte-level one")
        tokenizer = byte_tokenizer()
    return model.train(), tokenizer


def load_texts(args) -> list[str]:
    if args.dataset is None:
        return builtin_corpus()
    import datasets

    if os.path.exists(args.dataset):
        files = (sorted(os.path.join(args.dataset, f) for f in os.listdir(args.dataset))
                 if os.path.isdir(args.dataset) else [args.dataset])
        exts = {os.path.splitext(f)[1].lower() for f in files}
        builders = {_FILE_BUILDERS.get(e) for e in exts}
        if len(builders) != 1 or None in builders:
            raise SystemExit(f"finetune: --dataset {args.dataset!r} has files of kinds {sorted(exts)}; "
                             f"give files of one kind among {', '.join(_FILE_BUILDERS)}")
        ds = datasets.load_dataset(builders.pop(), data_files=files, split="train")
    else:
        try:
            ds = datasets.load_dataset(args.dataset, split=args.dataset_split)
        except Exception as err:  # noqa: BLE001  (offline or unknown name: say so plainly)
            raise SystemExit(f"finetune: cannot load --dataset {args.dataset!r}: {err}") from None
    if args.text_column not in ds.column_names:
        raise SystemExit(f"finetune: --text-column {args.text_column!r} not in {ds.column_names}")
    return [t for t in ds[args.text_column] if t]


def build_blocks(args, tokenizer, accelerator: Accelerator) -> torch.Tensor:
    with accelerator.main_process_first():
        texts = load_texts(args)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    return pack_blocks(ids, args.seq_len, separator=sep)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def strategies_text(counts: dict) -> str:
    return ",".join(f"{k}x{v}" for k, v in sorted(counts.items())) or "-"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    W, rank = accelerator.num_processes, accelerator.process_index
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    print(f"[hiermoe] rank {rank}/{W} pid {os.getpid()} host {socket.gethostname()} device {accelerator.device} "
          f"backend {backend}", flush=True)
    set_seed(args.seed)
    plugin = HierMoEPlugin(topology=args.topology, dispatch=args.dispatch, swap_interval=args.swap_interval,
                           dense_sharding=args.dense_sharding)
    model, tokenizer = load_model_and_tokenizer(args, plugin, accelerator)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = build_blocks(args, tokenizer, accelerator)
    loader = DataLoader(TensorDataset(blocks), batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, args.max_steps // 10),
                              num_training_steps=args.max_steps)
    model, optimizer, loader, scheduler = plugin.prepare(accelerator, model, optimizer, loader, scheduler)
    topology = runtime_of(accelerator.unwrap_model(model)).topology
    log0(accelerator, f"[hiermoe] world size {W}, topology {topology}, dispatch {plugin.dispatch}, "
                      f"swap_interval {plugin.swap_interval}, dense {plugin.dense_sharding}, "
                      f"checkpointing {args.gradient_checkpointing}, precision {args.mixed_precision}, "
                      f"{len(blocks)} blocks of {args.seq_len} tokens")

    totals = Counter()
    strategies = Counter()
    losses = []
    bar = tqdm(total=args.max_steps, desc="fine-tune", disable=not accelerator.is_main_process, file=sys.stdout,
               dynamic_ncols=True)
    started = time.perf_counter()
    step, epoch = 0, 0
    while step < args.max_steps:
        loader.set_epoch(epoch)
        for (input_ids,) in loader:
            with accelerator.autocast():  # a no-op unless --mixed-precision bf16
                out = model(input_ids=input_ids, labels=input_ids)
            accelerator.backward(out.loss)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # global norm (plugin)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            loss = accelerator.reduce(out.loss.detach(), "mean").item()
            losses.append(loss)
            m = plugin.metrics  # summed over ranks for this step
            for key in ("tokens", "inter_node_bytes", "a2a_inter_node_bytes", "rows_sent", "a2a_rows_sent"):
                totals[key] += m[f"hiermoe/{key}"]
            step_strategies = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("hiermoe/strategy/")}
            strategies.update(step_strategies)
            totals["train_tokens"] += input_ids.numel() * W
            elapsed = time.perf_counter() - started
            saved = totals["a2a_inter_node_bytes"] - totals["inter_node_bytes"]
            base = totals["a2a_inter_node_bytes"]
            bar.set_postfix_str(
                f"loss {loss:.3f} | {totals['train_tokens'] / elapsed:,.0f} tok/s | inter-node "
                f"{fmt_bytes(totals['inter_node_bytes'])} (saved {fmt_bytes(saved)}, "
                f"{100 * saved / base if base else 0:.0f}% vs a2a) | {strategies_text(step_strategies)}"
            )
            bar.update(1)
            if step >= args.max_steps:
                break
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - started

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir)  # collective on a patched model: every rank calls it
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
    summary = {
        "model": args.model or DEFAULT_MODEL,
        "world_size": W,
        "backend": backend,
        "topology": str(topology),
        "dispatch": plugin.dispatch,
        "steps": step,
        "train_tokens": totals["train_tokens"],
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(totals["train_tokens"] / elapsed, 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "strategies": dict(strategies),
        "inter_node_bytes": totals["inter_node_bytes"],
        "a2a_inter_node_bytes": totals["a2a_inter_node_bytes"],
        "rows_sent": totals["rows_sent"],
        "a2a_rows_sent": totals["a2a_rows_sent"],
        "swaps_done": plugin.swaps_done,
        "dense_sharding": plugin.dense_sharding,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mixed_precision": args.mixed_precision,
        "bytes_per_row": bytes_per_row(unwrapped),
        "checkpoint": os.path.abspath(args.output_dir),
    }
    if accelerator.is_main_process:
        print(summary_table(summary), flush=True)
        with open(os.path.join(args.output_dir, "hiermoe_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def bytes_per_row(model) -> list[int]:
    """Bytes per dispatched row in the last exchange (hidden x 2 under bf16 autocast, x 4 in fp32)."""
    stages = [s for layer in hiermoe_hf.stats(model).values() for s in layer.get("stages", []) if s["rows_sent"]]
    return sorted({s["bytes_sent"] // s["rows_sent"] for s in stages})


def summary_table(s: dict) -> str:
    base, sent = s["a2a_inter_node_bytes"], s["inter_node_bytes"]
    saved = f"{100 * (base - sent) / base:.1f}%" if base else "n/a (one node)"
    rows_ratio = f" ({s['a2a_rows_sent'] / s['rows_sent']:.2f}x fewer)" if s["rows_sent"] else ""
    rows = [
        ("model", s["model"]),
        ("ranks / backend / topology", f"{s['world_size']} / {s['backend']} / {s['topology']}"),
        ("steps / tokens / time", f"{s['steps']} / {s['train_tokens']:,} / {s['seconds']:.1f} s"),
        ("throughput", f"{s['tokens_per_s']:,.0f} tokens/s"),
        ("loss first -> last", f"{s['loss_first']:.4f} -> {s['loss_last']:.4f}"),
        ("strategies (layer forwards)", strategies_text(s["strategies"])),
        ("inter-node dispatch bytes", f"{fmt_bytes(sent)} vs a2a {fmt_bytes(base)}: saved {saved}"),
        ("rows sent, all stages", f"{s['rows_sent']:,} vs a2a {s['a2a_rows_sent']:,}{rows_ratio}"),
        ("expert swaps", str(s["swaps_done"])),
        ("checkpoint", f"{s['checkpoint']} (plain from_pretrained loads it)"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
    note = ("bytes: forward dispatch of hidden rows, summed over ranks; the combine and both backward exchanges\n"
            "move the same rows again.")
    return f"HierMoE fine-tune summary\n{line}\n{body}\n{line}\n{note}"


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        # all ranks finish together, then tear the groups down: without this, gloo ranks often abort
        # at interpreter exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
