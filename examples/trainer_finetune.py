"""Fine-tune a Hugging Face MoE model with HierMoE expert parallelism under ``transformers.Trainer``.

    accelerate launch --config_file examples/accelerate_configs/cpu_4proc.yaml examples/trainer_finetune.py \\
        --topology 2x2 --max-steps 30 --output-dir outputs/trainer_finetune

Same model, data and options as ``examples/finetune.py`` (the Accelerate loop); here the only HierMoE
line is ``callbacks=[HierMoECallback(...)]``, plus the final collective ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments, default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # share finetune.py's model and data helpers
from finetune import DEFAULT_MODEL, build_blocks, load_model_and_tokenizer  # noqa: E402

from hiermoe_hf.accelerate import HierMoEPlugin  # noqa: E402
from hiermoe_hf.trainer import HierMoECallback  # noqa: E402


class Blocks(torch.utils.data.Dataset):
    """Fixed-length causal-LM blocks; the model shifts the labels itself."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def argument_parser(description: str, max_steps: int, output_dir: str) -> argparse.ArgumentParser:
    """The flags of the Trainer examples (this one and examples/sft_finetune.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="Hub name or local folder; default: " + DEFAULT_MODEL)
    p.add_argument("--dataset", default=None, help="datasets name or local files; default: built-in corpus")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--dispatch", default=None)
    p.add_argument("--topology", default=None)
    p.add_argument("--swap-interval", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=max_steps)
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return argument_parser(__doc__.split("\n\n")[0], 30, "outputs/trainer_finetune").parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, max_grad_norm=args.max_grad_norm, lr_scheduler_type="cosine", warmup_steps=1,
        logging_steps=max(1, args.max_steps // 10), save_strategy="steps", save_steps=args.max_steps,
        report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True, seed=args.seed,
        ddp_find_unused_parameters=False,  # DDP sees dense parameters only, and every one is used each step
    )
    accelerator = _StateOnly(training_args)  # the Trainer's own Accelerator does not exist yet
    world, rank = accelerator.num_processes, accelerator.process_index
    print(f"[hiermoe] rank {rank}/{world} pid {os.getpid()} backend {dist.get_backend() if world > 1 else 'none'}",
          flush=True)
    fields = dict(topology=args.topology, dispatch=args.dispatch, swap_interval=args.swap_interval)
    model, tokenizer = load_model_and_tokenizer(args, HierMoEPlugin(**fields), accelerator)
    blocks = build_blocks(args, tokenizer, accelerator)
    callback = HierMoECallback(**fields)
    trainer = Trainer(model=model, args=training_args, train_dataset=Blocks(blocks), processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=[callback])  # fixed-length blocks: no padding
    trainer.train()
    trainer.model.save_pretrained(args.output_dir)  # collective on a patched model: every rank calls it
    if training_args.should_save:
        tokenizer.save_pretrained(args.output_dir)
        m = callback.metrics
        print(f"[hiermoe] done: {callback.step} steps, inter-node bytes in the last step "
              f"{m.get('hiermoe/inter_node_bytes', 0):,} vs a2a {m.get('hiermoe/a2a_inter_node_bytes', 0):,}; "
              f"checkpoint {os.path.abspath(args.output_dir)}", flush=True)


class _StateOnly:
    """The bits of an Accelerator the shared helpers use, from the process state TrainingArguments set up."""

    def __init__(self, training_args: TrainingArguments):
        from accelerate import PartialState

        training_args.device  # noqa: B018  (initialises the process group, as Trainer would)
        self._state = PartialState()
        self.num_processes = self._state.num_processes
        self.process_index = self._state.process_index
        self.is_main_process = self._state.is_main_process

    def main_process_first(self):
        return self._state.main_process_first()


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        # all ranks finish together, then tear the groups down: without this, gloo ranks often abort
        # at interpreter exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
