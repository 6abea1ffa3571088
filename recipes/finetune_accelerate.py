"""Fine-tune a GLU causal LM with a plain Accelerate loop (the same job as finetune_trainer.py).

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/finetune_accelerate.py --model my-glu --output-dir runs/ft
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_accelerate.py ...   # DDP

Writes checkpoint-N/ (accelerator.save_state, renamed into place only once complete) every
--save-steps, final/ (a complete checkpoint, LoRA merged), adapter/ (with --lora), results.json, and
weights-rank{R}.sha256 per process when the weights are replicated (DDP), to check the ranks agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import hf_glu  # noqa: F401  (registers the GLU classes with the Auto classes and PEFT)
from hf_glu.finetune import (
    build_datasets_from_args,
    check_finetune_args,
    checkpoint_step,
    distillation_loss,
    finetune_arg_parser,
    latest_checkpoint,
    load_model_and_tokenizer,
    load_teacher,
    lora_config,
    perplexity_from_loss,
    run_recipe,
    save_final,
    token_loss_sums,
    weights_digest,
    write_json,
)

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def parse_args():
    parser = finetune_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="default: the config's")
    args = parser.parse_args()
    check_finetune_args(parser, args)
    return args


def training_loss(model, batch, teacher, args) -> torch.Tensor:
    """Mean next-token CE of this micro-batch, with the KL term when distilling. Packed blocks all have
    the same number of targets, so Accelerate's mean over micro-batches equals the per-token mean."""
    outputs = model(**batch)
    if teacher is None:
        return outputs.loss
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
    return distillation_loss(
        outputs.logits,
        teacher_logits,
        batch["labels"],
        outputs.loss,
        alpha=args.kd_alpha,
        temperature=args.kd_temperature,
    )


@torch.no_grad()
def evaluate(model, eval_loader, accelerator) -> float:
    """Token-weighted eval loss over the whole held-out set, gathered from every process."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in eval_loader:
        logits = model(input_ids=batch["input_ids"]).logits
        sums, counts = accelerator.gather_for_metrics(token_loss_sums(logits, batch["labels"]))
        total += sums.sum().item()
        count += counts.sum().item()
    model.train()
    return total / count


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> None:
    """save_state into a temporary name, then rename: a run killed mid-save leaves no checkpoint-N
    that --resume would pick up."""
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(final)
        old = sorted(output_dir.glob("checkpoint-*[0-9]"), key=checkpoint_step)[:-keep] if keep > 0 else []
        for folder in old:
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(
        # Without cpu=True a CPU-only launch of several processes would run each as a lone process
        # (DistributedType.NO); with it they join one gloo process group.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=args.mixed_precision,
        # an optimizer step every grad_accum micro-batches, across epoch ends too, so a step count
        # alone says where in the data stream a checkpoint stopped
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False),
        # a seeded sampler makes each epoch's order a function of (seed, epoch), so a resumed run
        # sees the batches the killed one would have
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if args.lora and accelerator.distributed_type in SHARDED:
        raise SystemExit("--lora with FSDP/DeepSpeed is not supported here: merging needs unsharded weights")

    model, tokenizer = load_model_and_tokenizer(args.model, args.convert_from, args.variant, args.init)
    with accelerator.main_process_first():  # a dataset download (--dataset) happens once
        train_data, eval_data = build_datasets_from_args(tokenizer, args)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args))
    teacher = load_teacher(args.distill_from, model).to(accelerator.device) if args.distill_from else None

    train_loader = DataLoader(train_data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    eval_loader = DataLoader(eval_data, batch_size=args.batch_size)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
    )
    # A prepared scheduler steps once per process per optimizer step, hence the factor.
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    step = 0
    checkpoint = latest_checkpoint(output_dir) if args.resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = checkpoint_step(checkpoint)
        accelerator.print(f"resuming from {checkpoint} (step {step})")
    elif args.resume:
        accelerator.print("no checkpoint yet: from step 0")
    resumed_from = step

    step, log_history = train(model, teacher, optimizer, scheduler, train_loader, eval_loader, accelerator, args, step)
    eval_loss = evaluate(model, eval_loader, accelerator)
    accelerator.print(f"eval loss {eval_loss:.4f}  perplexity {perplexity_from_loss(eval_loss):.2f}")
    results = {
        "eval_loss": eval_loss,
        "perplexity": perplexity_from_loss(eval_loss),
        "global_step": step,
        "resumed_from_step": resumed_from,
        "num_processes": accelerator.num_processes,
        "log_history": log_history,
    }
    finish(model, tokenizer, accelerator, args, results)


def train(model, teacher, optimizer, scheduler, train_loader, eval_loader, accelerator, args, step: int):
    """Run optimizer steps from ``step`` to ``args.max_steps``; returns the last step and this run's logs."""
    output_dir = Path(args.output_dir)
    micro_batches = step * args.grad_accum  # where in the data stream the checkpoint stopped
    log_history, running = [], []
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process)
    model.train()
    while step < args.max_steps:
        epoch, offset = divmod(micro_batches, len(train_loader))
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, offset) if offset else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, batch, teacher, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro_batches += 1
            running.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                mean_loss = accelerator.reduce(torch.stack(running).mean(), "mean").item()
                record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
                log_history.append(record)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                running = []
            if args.eval_steps and step % args.eval_steps == 0:
                eval_loss = evaluate(model, eval_loader, accelerator)
                log_history.append(
                    {"step": step, "eval_loss": eval_loss, "perplexity": perplexity_from_loss(eval_loss)}
                )
            if step % args.save_steps == 0:
                save_checkpoint(accelerator, output_dir, step, args.save_total_limit)
            if step >= args.max_steps:
                break
    progress.close()
    return step, log_history


def finish(model, tokenizer, accelerator, args, results: dict) -> None:
    """Per-rank weight digests (replicated weights only), then the final folder from the main process."""
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type not in SHARDED:
        digest = weights_digest(unwrapped)
        (output_dir / f"weights-rank{accelerator.process_index}.sha256").write_text(digest + "\n")
    # Sharded weights are gathered into a full state dict (a collective call: every rank joins).
    state_dict = accelerator.get_state_dict(model) if accelerator.distributed_type in SHARDED else None
    if accelerator.is_main_process:
        final = output_dir / "final"
        save_final(unwrapped, tokenizer, final, adapter_folder=output_dir / "adapter", state_dict=state_dict)
        write_json(output_dir / "results.json", results)
        print(f"saved {final}")
        if args.push_to_hub:
            from hf_glu.hub import push_checkpoint  # imported here: only a pushing run needs the Hub client

            push_checkpoint(final, args.push_to_hub, private=args.private)
            print(f"pushed {final} to {args.push_to_hub}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    raise SystemExit(run_recipe(main))
