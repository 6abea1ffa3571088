"""Fine-tune a GLU causal LM with the transformers Trainer.

    python recipes/finetune_trainer.py --model my-glu --output-dir runs/ft --max-steps 1000
    python recipes/finetune_trainer.py --convert-from gpt2 --variant swiglu --distill-from gpt2 \
        --kd-alpha 0.5 --output-dir runs/swiglu
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu_ddp.yaml recipes/finetune_trainer.py ...

Writes checkpoint-N/ every --save-steps (resume with --resume), final/ (a complete checkpoint, LoRA
merged), adapter/ (with --lora) and results.json (eval loss and perplexity).
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

import hf_glu  # noqa: F401  (registers the GLU classes with the Auto classes and PEFT)
from hf_glu.bad_input import run_script
from hf_glu.finetune import (
    DistillationTrainer,
    check_checkpoint,
    check_checkpoint_fits,
    checkpoint_step,
    finetune_arg_parser,
    is_sharded,
    latest_checkpoint,
    parse_finetune_args,
    perplexity_from_loss,
    push_final,
    save_final,
    start_finetuning,
)
from hf_glu.jsonio import write_json

# Trainer writes trainer_state.json last into a checkpoint: without it the folder was cut short.
COMPLETE_MARKER = "trainer_state.json"


def parse_args():
    parser = finetune_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    args = parse_finetune_args(parser)
    if is_sharded(args):
        # Transformers' Trainer keeps no resumable checkpoint of a model sharded at load time, and its TP needs
        # Accelerate's ParallelismConfig, which refuses CPU processes; the Accelerate recipe does both.
        parser.error(
            "--tp-size/--fsdp-size are taken by recipes/finetune_accelerate.py (under torchrun); for the Trainer "
            "use accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml"
        )
    return args


def training_arguments(args) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        bf16=args.bf16,
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        # A stream (--streaming) is read by every process, each keeping its own part, rather than read by the
        # main process and sent out (it never ends: no last round to top up with earlier blocks).
        accelerator_config={"dispatch_batches": False} if args.streaming else None,
    )


def main() -> None:
    args = parse_args()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    model, tokenizer, teacher, train_data, eval_data = start_finetuning(args)
    if args.lora:
        model.print_trainable_parameters()

    common = dict(
        model=model,
        args=training_arguments(args),
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=default_data_collator,
        processing_class=tokenizer,  # saved into every checkpoint and the final folder
    )
    if teacher is not None:
        trainer = DistillationTrainer(
            **common, teacher=teacher, kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature
        )
    else:
        trainer = Trainer(**common)

    checkpoint = latest_checkpoint(output_dir, COMPLETE_MARKER) if args.resume else None
    if checkpoint is not None:
        check_checkpoint(checkpoint)
        check_checkpoint_fits(checkpoint, trainer.model)
    resumed_from = checkpoint_step(checkpoint) if checkpoint else 0
    if args.resume:
        print(f"resuming from {checkpoint} (step {resumed_from})" if checkpoint else "no checkpoint yet: from step 0")
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    metrics = trainer.evaluate()
    results = {
        "eval_loss": metrics["eval_loss"],
        "perplexity": perplexity_from_loss(metrics["eval_loss"]),
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "log_history": trainer.state.log_history,
    }
    print(f"eval loss {results['eval_loss']:.4f}  perplexity {results['perplexity']:.2f}")

    final = output_dir / "final"
    if args.lora:
        if trainer.is_world_process_zero():
            save_final(trainer.model, tokenizer, final, adapter_folder=output_dir / "adapter")
    else:
        trainer.save_model(str(final))  # on every rank: gathers the weights under FSDP / DeepSpeed
    if trainer.is_world_process_zero():
        write_json(output_dir / "results.json", results)
        print(f"saved {final}")
        push_final(final, args)


if __name__ == "__main__":
    raise SystemExit(run_script(main))
