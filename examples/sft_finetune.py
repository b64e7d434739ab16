"""Supervised fine-tuning with TRL's ``SFTTrainer`` and HierMoE expert parallelism.

    pip install -e ".[trl]"        # TRL is optional; the dev extra includes it
    accelerate launch --config_file examples/accelerate_configs/cpu_4proc.yaml examples/sft_finetune.py \\
        --topology 2x2 --max-steps 20 --output-dir outputs/sft_finetune [--lora]

The only HierMoE lines are ``callbacks=[HierMoECallback(...)]`` and the final collective
``save_pretrained``; everything else is an ordinary ``SFTTrainer`` on a ``datasets.Dataset`` of text
(the embedded model, byte tokenizer and standard-library docstrings unless ``--model`` / ``--dataset``
are given). ``--lora`` trains LoRA adapters on the attention projections (PEFT) instead of the whole
model. The logged ``grad_norm`` is the global one and the ``hiermoe/*`` metrics are in the Trainer's
logs (``log_history``, ``trainer_state.json``, every ``report_to`` integration).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # share finetune.py's model and data helpers
from finetune import load_model_and_tokenizer, load_texts  # noqa: E402
from trainer_finetune import _StateOnly, argument_parser  # noqa: E402

from hiermoe_hf.accelerate import HierMoEPlugin  # noqa: E402
from hiermoe_hf.trainer import HierMoECallback  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # attention: LoRA on the routed experts is refused


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__.split("\n\n")[0], 20, "outputs/sft_finetune")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on attention instead of full fine-tuning")
    return p.parse_args(argv)


def sft_config(args: argparse.Namespace, **overrides):
    from trl import SFTConfig

    kwargs = dict(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, max_grad_norm=args.max_grad_norm, lr_scheduler_type="cosine", warmup_steps=1,
        logging_steps=max(1, args.max_steps // 10), save_strategy="steps", save_steps=args.max_steps,
        report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True, seed=args.seed,
        max_length=args.seq_len, dataset_text_field="text",
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default bf16 would autocast on CPU
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def build_trainer(model, tokenizer, dataset, config, callback: HierMoECallback | None, lora: bool = False):
    """An ``SFTTrainer``; ``callback=None`` is plain DDP (the comparison the tests make)."""
    from trl import SFTTrainer

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[callback] if callback is not None else None)


def main(argv=None) -> None:
    import datasets

    args = parse_args(argv)
    config = sft_config(args)
    accelerator = _StateOnly(config)  # the Trainer's own Accelerator does not exist yet
    world, rank = accelerator.num_processes, accelerator.process_index
    print(f"[hiermoe] rank {rank}/{world} pid {os.getpid()} backend {dist.get_backend() if world > 1 else 'none'}",
          flush=True)
    fields = dict(topology=args.topology, dispatch=args.dispatch, swap_interval=args.swap_interval)
    model, tokenizer = load_model_and_tokenizer(args, HierMoEPlugin(**fields), accelerator)
    with accelerator.main_process_first():
        dataset = datasets.Dataset.from_dict({"text": load_texts(args)})
    callback = HierMoECallback(**fields)
    trainer = build_trainer(model, tokenizer, dataset, config, callback, lora=args.lora)
    trainer.train()
    # Every rank: collective for a patched model; with --lora, PEFT's save of the adapter.
    trainer.model.save_pretrained(args.output_dir)
    if config.should_save:
        tokenizer.save_pretrained(args.output_dir)
        last = [h for h in trainer.state.log_history if "loss" in h][-1]
        print(f"[hiermoe] done: step {last['step']}, loss {last['loss']:.4f}, grad_norm {last['grad_norm']:.4f}, "
              f"inter-node bytes {last.get('hiermoe/inter_node_bytes', 0):,} vs a2a "
              f"{last.get('hiermoe/a2a_inter_node_bytes', 0):,}; output {os.path.abspath(args.output_dir)}",
              flush=True)


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.barrier()  # all ranks finish together, then tear the groups down (gloo aborts otherwise)
        dist.destroy_process_group()
