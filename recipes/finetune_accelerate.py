"""Fine-tune a GLU causal LM with a plain Accelerate loop (the same job as finetune_trainer.py).

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/finetune_accelerate.py --model my-glu --output-dir runs/ft
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_accelerate.py ...   # DDP
    torchrun --nproc_per_node 2 recipes/finetune_accelerate.py --model my-glu --tp-size 2 ...     # TP
    torchrun --nproc_per_node 2 recipes/finetune_accelerate.py --model my-glu --fsdp-size 2 ...   # FSDP2

Writes checkpoint-N/ (accelerator.save_state, renamed into place only once complete) every
--save-steps, final/ (a complete checkpoint, LoRA merged), adapter/ (with --lora), results.json, and
weights-rank{R}.sha256 per process when the weights are replicated (DDP), to check the ranks agree.

With --tp-size/--fsdp-size, Transformers shards the model at load time and a plain PyTorch loop trains
it (Accelerate would wrap the sharded model in DDP, and it refuses its own TP/FSDP on CPU);
checkpoint-N/ is then a torch.distributed.checkpoint of model and optimizer, one shard file per process.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, DistributedType
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_scheduler

import hf_glu  # noqa: F401  (registers the GLU classes with the Auto classes and PEFT)
from hf_glu.finetune import (
    build_datasets_from_args,
    check_block_size,
    check_checkpoint,
    check_checkpoint_fits,
    check_finetune_args,
    check_one_batch,
    check_tensor_parallel,
    checkpoint_step,
    distillation_loss,
    distributed_config_from_args,
    finetune_arg_parser,
    is_sharded,
    latest_checkpoint,
    load_model_and_tokenizer,
    load_teacher,
    lora_config,
    perplexity_from_loss,
    run_recipe,
    save_final,
    sweep_partial_checkpoints,
    token_loss_sums,
    weights_digest,
    write_json,
)

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
# Written last into a sharded (torch.distributed.checkpoint) checkpoint-N: without it the folder was cut short.
SHARDED_MARKER = "state.json"


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
        # A checkpoint-N of an earlier run into this folder (not resumed from) would block the rename.
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        old = sorted(output_dir.glob("checkpoint-*[0-9]"), key=checkpoint_step)[:-keep] if keep > 0 else []
        for folder in old:
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()


def main() -> None:
    args = parse_args()
    if is_sharded(args):
        sharded_main(args)
        return
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
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True,
            # A stream is read by every process, each keeping its own batches,
            # rather than read by the main process alone and sent out.
            dispatch_batches=False if args.streaming else None,
        ),
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if args.lora and accelerator.distributed_type in SHARDED:
        raise SystemExit("--lora with FSDP/DeepSpeed is not supported here: merging needs unsharded weights")

    model, tokenizer = load_model_and_tokenizer(args.model, args.convert_from, args.variant, args.init)
    check_block_size(args.block_size, model)
    with accelerator.main_process_first():  # a dataset download (--dataset) happens once
        train_data, eval_data = build_datasets_from_args(tokenizer, args)
    if not args.streaming:  # batches are dropped when partial: each process needs a full one
        check_one_batch(len(train_data), args.batch_size, accelerator.num_processes, args.block_size)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args))
    teacher = load_teacher(args.distill_from, model).to(accelerator.device) if args.distill_from else None

    # A stream is read in its order (no index to shuffle; --shuffle-buffer shuffles it), and its own generator
    # keeps the iterator from drawing a seed from the global RNG (which a resumed run has restored: a draw would
    # shift its dropout masks).
    stream_generator = torch.Generator().manual_seed(args.seed) if args.streaming else None
    train_loader = DataLoader(
        train_data, batch_size=args.batch_size, shuffle=not args.streaming, drop_last=True, generator=stream_generator
    )
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
        check_checkpoint(checkpoint)
        check_checkpoint_fits(checkpoint, accelerator.unwrap_model(model))
        accelerator.load_state(str(checkpoint))
        step = checkpoint_step(checkpoint)
        accelerator.print(f"resuming from {checkpoint} (step {step})")
    elif args.resume:
        accelerator.print("no checkpoint yet: from step 0")
    resumed_from = step
    # Created only now, every check passed: a refused run leaves no folder behind.
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)  # per-rank files are written before final/
        sweep_partial_checkpoints(output_dir)
    accelerator.wait_for_everyone()

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
        if args.streaming:
            batches = itertools.islice(train_loader, micro_batches, None)  # a stream never ends: one pass
        else:
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
        if state_dict is not None:
            unwrapped, state_dict = unsharded_copy(unwrapped, state_dict), None
        save_final(unwrapped, tokenizer, final, adapter_folder=output_dir / "adapter", state_dict=state_dict)
        write_json(output_dir / "results.json", results)
        print(f"saved {final}")
        if args.push_to_hub:
            from hf_glu.hub import push_checkpoint  # imported here: only a pushing run needs the Hub client

            push_checkpoint(final, args.push_to_hub, private=args.private)
            print(f"pushed {final} to {args.push_to_hub}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---- sharded at load time (--tp-size / --fsdp-size, under torchrun) -------------------------------------


def sharded_main(args) -> None:
    """The same job on a model Transformers shards at load time (DistributedConfig), in plain PyTorch."""
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if args.tp_size > 1:
        check_tensor_parallel(args.model, args.tp_size)
    model, tokenizer = load_model_and_tokenizer(args.model, distributed_config=distributed_config_from_args(args))
    check_block_size(args.block_size, model)
    # Transformers' mesh is (pp, dp_replicate, fsdp, tp), tp innermost: the processes of one TP group are
    # consecutive ranks and must see the same batch; only the FSDP dimension splits the data.
    data_rank = dist.get_rank() // args.tp_size
    train_data, eval_data = build_datasets_from_args(tokenizer, args, rank=data_rank, world_size=args.fsdp_size)
    sampler = None
    if not args.streaming:  # a stream was split above, before packing
        check_one_batch(len(train_data), args.batch_size, args.fsdp_size, args.block_size)
        sampler = DistributedSampler(
            train_data, num_replicas=args.fsdp_size, rank=data_rank, seed=args.seed, drop_last=True
        )
    # Its own generator: a new epoch's iterator then draws no seed from the global RNG, which a resumed run
    # restores to the saved state (dropout masks included).
    train_loader = DataLoader(
        train_data,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # Every process evaluates the whole held-out set: the sharded forward needs all ranks in step, and
    # no padding of uneven shards can then count a block twice.
    eval_loader = DataLoader(eval_data, batch_size=args.batch_size)
    # Built before any forward: FSDP2 leaves some units unsharded after one, and the optimizer must get the
    # sharded parameters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps
    )

    step = 0
    checkpoint = latest_checkpoint(output_dir, SHARDED_MARKER) if args.resume else None
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, model)
        step = load_sharded_checkpoint(checkpoint, model, optimizer, scheduler)
        print_once(f"resuming from {checkpoint} (step {step})")
    elif args.resume:
        print_once("no checkpoint yet: from step 0")
    resumed_from = step
    if dist.get_rank() == 0:  # only now, every check passed (see main)
        output_dir.mkdir(parents=True, exist_ok=True)
        sweep_partial_checkpoints(output_dir)
    dist.barrier()

    step, log_history = train_sharded(model, optimizer, scheduler, train_loader, eval_loader, args, step)
    eval_loss = evaluate_everywhere(model, eval_loader)
    print_once(f"eval loss {eval_loss:.4f}  perplexity {perplexity_from_loss(eval_loss):.2f}")
    results = {
        "eval_loss": eval_loss,
        "perplexity": perplexity_from_loss(eval_loss),
        "global_step": step,
        "resumed_from_step": resumed_from,
        "num_processes": dist.get_world_size(),
        "tp_size": args.tp_size,
        "fsdp_size": args.fsdp_size,
        "log_history": log_history,
    }
    finish_sharded(model, tokenizer, args, results)


def print_once(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def train_sharded(model, optimizer, scheduler, train_loader, eval_loader, args, step: int):
    """``train`` for a model sharded at load time: TP and FSDP2 reduce the gradients themselves."""
    output_dir = Path(args.output_dir)
    micro_batches = step * args.grad_accum  # where in the data stream the checkpoint stopped
    log_history, running = [], []
    progress = tqdm(total=args.max_steps, initial=step, disable=dist.get_rank() != 0)
    model.train()
    while step < args.max_steps:
        if args.streaming:
            batches = itertools.islice(train_loader, micro_batches, None)  # a stream never ends: one pass
        else:
            epoch, offset = divmod(micro_batches, len(train_loader))
            train_loader.sampler.set_epoch(epoch)
            batches = itertools.islice(train_loader, offset, None)
        for batch in batches:
            loss = training_loss(model, batch, None, args)
            (loss / args.grad_accum).backward()
            micro_batches += 1
            running.append(loss.detach())
            if micro_batches % args.grad_accum:
                continue
            if args.max_grad_norm > 0:
                clip_grad_norm(model, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                mean_loss = mean_over_processes(torch.stack(running).mean())
                log_history.append({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                running = []
            if args.eval_steps and step % args.eval_steps == 0:
                eval_loss = evaluate_everywhere(model, eval_loader)
                log_history.append(
                    {"step": step, "eval_loss": eval_loss, "perplexity": perplexity_from_loss(eval_loss)}
                )
            if step % args.save_steps == 0:
                save_sharded_checkpoint(model, optimizer, scheduler, output_dir, step, args.save_total_limit)
            if step >= args.max_steps:
                break
    progress.close()
    return step, log_history


def mean_over_processes(value: torch.Tensor) -> float:
    """The mean over all processes (the ranks of one TP group hold equal values, so each data shard counts
    the same); gloo has no AVG reduction, hence the sum."""
    total = value.detach().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


@torch.no_grad()
def clip_grad_norm(model, max_norm: float) -> float:
    """Scale the gradients to a global 2-norm of at most ``max_norm``. TP leaves some parameters plain and
    others DTensors, which ``torch.nn.utils.clip_grad_norm_`` cannot stack; a DTensor's norm is reduced to
    the full one here."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


@torch.no_grad()
def evaluate_everywhere(model, eval_loader) -> float:
    """Token-weighted eval loss over the whole held-out set, which every process runs."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in eval_loader:
        sums, counts = token_loss_sums(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        total += sums.sum().item()
        count += counts.sum().item()
    model.train()
    return total / count


def save_sharded_checkpoint(model, optimizer, scheduler, output_dir: Path, step: int, keep: int) -> None:
    """Every process writes its shards of model and optimizer (torch.distributed.checkpoint) into a temporary
    folder; once all have finished, rank 0 adds the scheduler, the marker, and renames the folder into place,
    so --resume never meets a half-written checkpoint-N."""
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial))
    torch.save(torch.get_rng_state(), partial / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / SHARDED_MARKER).write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        complete = [c for c in output_dir.glob("checkpoint-*[0-9]") if (c / SHARDED_MARKER).is_file()]
        for folder in sorted(complete, key=checkpoint_step)[:-keep] if keep > 0 else []:
            shutil.rmtree(folder)
    dist.barrier()


def load_sharded_checkpoint(checkpoint: Path, model, optimizer, scheduler) -> int:
    """Restore model and optimizer shards, scheduler and this rank's RNG from ``save_sharded_checkpoint``'s
    folder; returns its step."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
    rng = checkpoint / f"rng-rank{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming on more processes than saved
        torch.set_rng_state(torch.load(rng))
    return json.loads((checkpoint / SHARDED_MARKER).read_text())["step"]


def finish_sharded(model, tokenizer, args, results: dict) -> None:
    """Gather the full weights (every process joins), then rank 0 writes final/ and results.json."""
    output_dir = Path(args.output_dir)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        final = output_dir / "final"
        save_final(unsharded_copy(model, full), tokenizer, final)
        write_json(output_dir / "results.json", results)
        print(f"saved {final}", flush=True)
        if args.push_to_hub:
            from hf_glu.hub import push_checkpoint  # imported here: only a pushing run needs the Hub client

            push_checkpoint(final, args.push_to_hub, private=args.private)
            print(f"pushed {final} to {args.push_to_hub}")
    dist.barrier()


def unsharded_copy(model, state_dict: dict):
    """The model's own class, unsharded, holding the gathered ``state_dict``. FSDP2 swaps a model's class for a
    generated ``FSDP<Name>`` subclass; saving that one writes it into config.auto_map and copies PyTorch's FSDP
    sources next to the weights as remote code, which then cannot load."""
    model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config = copy.deepcopy(model.config)
    if hasattr(config, "distributed_config"):
        del config.distributed_config  # the copy lives in one process
    plain = model_class(config)
    plain.load_state_dict(state_dict)
    return plain


if __name__ == "__main__":
    status = run_recipe(main)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(status)
