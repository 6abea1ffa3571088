"""Fine-tune a GLU causal LM with a plain Accelerate loop (the same job as finetune_trainer.py).

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/finetune_accelerate.py --model my-glu --output-dir runs/ft
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_accelerate.py ...   # DDP
    torchrun --nproc_per_node 2 recipes/finetune_accelerate.py --model my-glu --tp-size 2 ...     # TP
    torchrun --nproc_per_node 2 recipes/finetune_accelerate.py --model my-glu --fsdp-size 2 ...   # FSDP2

Writes checkpoint-N/ (accelerator.save_state, renamed into place only once complete) every
--save-steps, final/ (a complete checkpoint, LoRA merged), adapter/ (with --lora), results.json, and
weights-rank{R}.sha256 per process when the weights are replicated (DDP), to check the ranks agree.

With --tp-size/--fsdp-size, Transformers shards the model at load time and the same loop trains it in plain
PyTorch (Accelerate would wrap the sharded model in DDP, and it refuses its own TP/FSDP on CPU);
checkpoint-N/ is then a torch.distributed.checkpoint of model and optimizer, one shard file per process.

One program, main → train → evaluate → finish; what differs between the two ways of running it (data loaders,
the optimizer step, reductions over processes, checkpoints, the final gather) is in ``Accelerated`` and
``ShardedAtLoad`` below, which answer the same calls.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from contextlib import nullcontext
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
from hf_glu.bad_input import run_script
from hf_glu.finetune import (
    check_checkpoint,
    check_checkpoint_fits,
    checkpoint_step,
    distillation_loss,
    finetune_arg_parser,
    is_sharded,
    latest_checkpoint,
    parse_finetune_args,
    perplexity_from_loss,
    push_final,
    save_final,
    start_finetuning,
    sweep_partial_checkpoints,
    token_loss_sums,
    weights_digest,
)
from hf_glu.jsonio import write_json

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
# Written last into a sharded (torch.distributed.checkpoint) checkpoint-N: without it the folder was cut short.
SHARDED_MARKER = "state.json"


def parse_args():
    parser = finetune_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="default: the config's")
    return parse_finetune_args(parser)


def main() -> None:
    args = parse_args()
    job = ShardedAtLoad(args) if is_sharded(args) else Accelerated(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    model, tokenizer, teacher, train_data, eval_data = start_finetuning(
        args, data_part=job.data_part, batch_processes=job.batch_processes, main_process_first=job.main_process_first
    )
    train_loader = job.train_loader(train_data, args)
    eval_loader = DataLoader(eval_data, batch_size=args.batch_size)
    # Built before any forward: FSDP2 leaves some units unsharded after one, and the optimizer must get the
    # sharded parameters.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
    )
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=args.warmup_steps * job.scheduler_calls_per_step,
        num_training_steps=args.max_steps * job.scheduler_calls_per_step,
    )
    model, teacher, optimizer, train_loader, eval_loader, scheduler = job.prepare(
        model, teacher, optimizer, train_loader, eval_loader, scheduler
    )

    step = 0
    checkpoint = latest_checkpoint(output_dir, job.complete_marker) if args.resume else None
    if checkpoint is not None:
        step = job.load_checkpoint(checkpoint, model, optimizer, scheduler)
        job.print(f"resuming from {checkpoint} (step {step})")
    elif args.resume:
        job.print("no checkpoint yet: from step 0")
    resumed_from = step
    # Created only now, every check passed: a refused run leaves no folder behind.
    if job.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)  # per-rank files are written before final/
        sweep_partial_checkpoints(output_dir)
    job.wait_for_everyone()

    step, log_history = train(job, model, teacher, optimizer, scheduler, train_loader, eval_loader, args, step)
    eval_loss = evaluate(job, model, eval_loader)
    job.print(f"eval loss {eval_loss:.4f}  perplexity {perplexity_from_loss(eval_loss):.2f}")
    results = {
        "eval_loss": eval_loss,
        "perplexity": perplexity_from_loss(eval_loss),
        "global_step": step,
        "resumed_from_step": resumed_from,
        "num_processes": job.num_processes,
        **job.layout,
        "log_history": log_history,
    }
    finish(job, model, tokenizer, args, results)


def training_loss(model, batch, teacher, args) -> torch.Tensor:
    """Mean next-token CE of this micro-batch, with the KL term when distilling. Packed blocks all have
    the same number of targets, so the mean over micro-batches equals the per-token mean."""
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


def train(job: Job, model, teacher, optimizer, scheduler, train_loader, eval_loader, args, step: int):
    """Run optimizer steps from ``step`` to ``args.max_steps``; returns the last step and this run's logs."""
    output_dir = Path(args.output_dir)
    micro_batches = step * args.grad_accum  # where in the data stream the checkpoint stopped
    log_history, running = [], []
    progress = tqdm(total=args.max_steps, initial=step, disable=not job.shows_progress)
    model.train()
    while step < args.max_steps:
        if args.streaming:
            batches = itertools.islice(train_loader, micro_batches, None)  # a stream never ends: one pass
        else:
            epoch, offset = divmod(micro_batches, len(train_loader))
            batches = job.epoch_batches(train_loader, epoch, offset)
        for batch in batches:
            micro_batches += 1
            loss, stepped = job.train_step(model, batch, teacher, optimizer, scheduler, args, micro_batches)
            running.append(loss.detach())
            if not stepped:
                continue
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                mean_loss = job.mean_over_processes(torch.stack(running).mean())
                log_history.append({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                running = []
            if args.eval_steps and step % args.eval_steps == 0:
                eval_loss = evaluate(job, model, eval_loader)
                log_history.append(
                    {"step": step, "eval_loss": eval_loss, "perplexity": perplexity_from_loss(eval_loss)}
                )
            if step % args.save_steps == 0:
                job.save_checkpoint(model, optimizer, scheduler, output_dir, step, args.save_total_limit)
            if step >= args.max_steps:
                break
    progress.close()
    return step, log_history


@torch.no_grad()
def evaluate(job: Job, model, eval_loader) -> float:
    """Token-weighted eval loss over the whole held-out set, gathered from every process that holds a part."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in eval_loader:
        logits = model(input_ids=batch["input_ids"]).logits
        sums, counts = job.gather(token_loss_sums(logits, batch["labels"]))
        total += sums.sum().item()
        count += counts.sum().item()
    model.train()
    return total / count


def finish(job: Job, model, tokenizer, args, results: dict) -> None:
    """Per-rank weight digests (replicated weights only), then the final folder from the main process."""
    output_dir = Path(args.output_dir)
    job.wait_for_everyone()
    if job.replicated:
        digest = weights_digest(job.unwrap(model))
        (output_dir / f"weights-rank{job.process_index}.sha256").write_text(digest + "\n")
    complete = job.complete_model(model)  # sharded weights are gathered: every process joins
    if job.is_main_process:
        final = output_dir / "final"
        save_final(complete, tokenizer, final, adapter_folder=output_dir / "adapter")
        write_json(output_dir / "results.json", results)
        print(f"saved {final}", flush=True)
        push_final(final, args)
    job.wait_for_everyone()
    job.end()


# ---- what differs: Accelerate (one process, DDP, Accelerate's FSDP/DeepSpeed) or sharded at load time -------------


class Accelerated:
    """Accelerate places the model, splits the batches between processes, reduces the gradients and checkpoints."""

    def __init__(self, args) -> None:
        self.accelerator = Accelerator(
            # Without cpu=True a CPU-only launch of several processes would run each as a lone process
            # (DistributedType.NO); with it they join one gloo process group.
            cpu=not torch.accelerator.is_available(),
            mixed_precision=args.mixed_precision,
            # an optimizer step every grad_accum micro-batches, across epoch ends too, so a step count
            # alone says where in the data stream a checkpoint stopped
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.grad_accum, sync_with_dataloader=False
            ),
            # a seeded sampler makes each epoch's order a function of (seed, epoch), so a resumed run
            # sees the batches the killed one would have
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True,
                # A stream is read by every process, each keeping its own batches,
                # rather than read by the main process alone and sent out.
                dispatch_batches=False if args.streaming else None,
            ),
        )
        self.replicated = self.accelerator.distributed_type not in SHARDED
        if args.lora and not self.replicated:
            raise ValueError(
                "--lora with FSDP/DeepSpeed is not supported here: merging needs unsharded weights; accepted: --lora "
                "with one process or DDP, or FSDP/DeepSpeed without --lora"
            )
        self.num_processes = self.accelerator.num_processes
        self.batch_processes = self.num_processes  # batches are dropped when partial: each process needs a full one
        # A prepared scheduler steps once per process per optimizer step.
        self.scheduler_calls_per_step = self.num_processes
        self.main_process_first = self.accelerator.main_process_first  # a dataset download (--dataset) happens once
        self.is_main_process = self.accelerator.is_main_process
        self.shows_progress = self.accelerator.is_local_main_process
        self.process_index = self.accelerator.process_index
        self.print = self.accelerator.print
        self.wait_for_everyone = self.accelerator.wait_for_everyone
        self.unwrap = self.accelerator.unwrap_model
        self.gather = self.accelerator.gather_for_metrics
        self.end = self.accelerator.end_training
        self.layout = {}  # results.json's record of the process layout: nothing beyond num_processes
        self.complete_marker = None  # Accelerate writes a checkpoint-N under a temporary name, renamed when complete

    def data_part(self) -> tuple[int, int]:
        """A stream stays whole: Accelerate gives each process its own batches of it."""
        return 0, 1

    def train_loader(self, train_data, args) -> DataLoader:
        # A stream is read in its order (no index to shuffle; --shuffle-buffer shuffles it), and its own generator
        # keeps the iterator from drawing a seed from the global RNG (which a resumed run has restored: a draw would
        # shift its dropout masks).
        generator = torch.Generator().manual_seed(args.seed) if args.streaming else None
        return DataLoader(
            train_data, batch_size=args.batch_size, shuffle=not args.streaming, drop_last=True, generator=generator
        )

    def prepare(self, model, teacher, optimizer, train_loader, eval_loader, scheduler):
        if teacher is not None:
            teacher = teacher.to(self.accelerator.device)
        model, optimizer, train_loader, eval_loader, scheduler = self.accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
        return model, teacher, optimizer, train_loader, eval_loader, scheduler

    def load_checkpoint(self, checkpoint: Path, model, optimizer, scheduler) -> int:
        check_checkpoint(checkpoint)
        check_checkpoint_fits(checkpoint, self.unwrap(model))
        self.accelerator.load_state(str(checkpoint))
        return checkpoint_step(checkpoint)

    def epoch_batches(self, train_loader, epoch: int, offset: int):
        train_loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(train_loader, offset) if offset else train_loader

    def train_step(self, model, batch, teacher, optimizer, scheduler, args, micro_batches: int):
        """One micro-batch; returns its loss and whether it ended an optimizer step (Accelerate counts them)."""
        with self.accelerator.accumulate(model):
            loss = training_loss(model, batch, teacher, args)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and args.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        return loss, self.accelerator.sync_gradients

    def mean_over_processes(self, value: torch.Tensor) -> float:
        return self.accelerator.reduce(value, "mean").item()

    def save_checkpoint(self, model, optimizer, scheduler, output_dir: Path, step: int, keep: int) -> None:
        """save_state into a temporary name, then rename: a run killed mid-save leaves no checkpoint-N
        that --resume would pick up."""
        final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
        self.accelerator.save_state(str(partial))
        self.wait_for_everyone()
        if self.is_main_process:
            # A checkpoint-N of an earlier run into this folder (not resumed from) would block the rename.
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            old = sorted(output_dir.glob("checkpoint-*[0-9]"), key=checkpoint_step)[:-keep] if keep > 0 else []
            for folder in old:
                shutil.rmtree(folder)
        self.wait_for_everyone()

    def complete_model(self, model):
        """The model to save, on the main process: sharded weights gathered into a full state dict (a collective
        call: every rank joins) and loaded into an unsharded copy."""
        unwrapped = self.unwrap(model)
        if self.replicated:
            return unwrapped
        state_dict = self.accelerator.get_state_dict(model)
        return unsharded_copy(unwrapped, state_dict) if self.is_main_process else None



class ShardedAtLoad:
    """--tp-size/--fsdp-size under torchrun: Transformers shards the model at load time (DistributedConfig) and
    plain PyTorch trains it (Accelerate would wrap the sharded model in DDP, and it refuses its own TP/FSDP on CPU).
    TP and FSDP2 reduce the gradients themselves; checkpoints are torch.distributed.checkpoint folders."""

    replicated = False
    complete_marker = SHARDED_MARKER

    def __init__(self, args) -> None:
        self.tp_size, self.fsdp_size = args.tp_size, args.fsdp_size
        self.layout = {"tp_size": args.tp_size, "fsdp_size": args.fsdp_size}
        self.batch_processes = args.fsdp_size
        self.scheduler_calls_per_step = 1
        self.main_process_first = nullcontext

    def data_part(self) -> tuple[int, int]:
        """Transformers' mesh is (pp, dp_replicate, fsdp, tp), tp innermost: the processes of one TP group are
        consecutive ranks and must see the same batch; only the FSDP dimension splits the data. Asked once the
        model is loaded, which set up the process group."""
        return dist.get_rank() // self.tp_size, self.fsdp_size

    @property
    def is_main_process(self) -> bool:
        return dist.get_rank() == 0

    shows_progress = is_main_process

    @property
    def process_index(self) -> int:
        return dist.get_rank()

    @property
    def num_processes(self) -> int:
        return dist.get_world_size()

    def print(self, message: str) -> None:
        if self.is_main_process:
            print(message, flush=True)

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def unwrap(self, model):
        return model

    def train_loader(self, train_data, args) -> DataLoader:
        data_rank = self.data_part()[0]
        sampler = None
        if not args.streaming:  # a stream was split when read, before packing
            sampler = DistributedSampler(
                train_data, num_replicas=self.fsdp_size, rank=data_rank, seed=args.seed, drop_last=True
            )
        # Its own generator: a new epoch's iterator then draws no seed from the global RNG, which a resumed run
        # restores to the saved state (dropout masks included).
        return DataLoader(
            train_data,
            batch_size=args.batch_size,
            sampler=sampler,
            drop_last=True,
            generator=torch.Generator().manual_seed(args.seed),
        )

    def prepare(self, *objects):
        """Nothing to wrap: the model is sharded already. Every process evaluates the whole held-out set: the
        sharded forward needs all ranks in step, and no padding of uneven shards can then count a block twice."""
        return objects

    def load_checkpoint(self, checkpoint: Path, model, optimizer, scheduler) -> int:
        """Restore model and optimizer shards, scheduler and this rank's RNG from ``save_checkpoint``'s folder;
        returns its step."""
        check_checkpoint_fits(checkpoint, model)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
        rng = checkpoint / f"rng-rank{dist.get_rank()}.pt"
        if rng.is_file():  # absent when resuming on more processes than saved
            torch.set_rng_state(torch.load(rng))
        return json.loads((checkpoint / SHARDED_MARKER).read_text())["step"]

    def epoch_batches(self, train_loader, epoch: int, offset: int):
        train_loader.sampler.set_epoch(epoch)
        return itertools.islice(train_loader, offset, None)

    def train_step(self, model, batch, teacher, optimizer, scheduler, args, micro_batches: int):
        """One micro-batch; returns its loss and whether it ended an optimizer step (every grad_accum-th)."""
        loss = training_loss(model, batch, teacher, args)
        (loss / args.grad_accum).backward()
        if micro_batches % args.grad_accum:
            return loss, False
        if args.max_grad_norm > 0:
            clip_grad_norm(model, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return loss, True

    def mean_over_processes(self, value: torch.Tensor) -> float:
        """The mean over all processes (the ranks of one TP group hold equal values, so each data shard counts
        the same); gloo has no AVG reduction, hence the sum."""
        total = value.detach().clone()
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()

    def gather(self, tensors):
        return tensors  # every process ran the whole held-out set

    def save_checkpoint(self, model, optimizer, scheduler, output_dir: Path, step: int, keep: int) -> None:
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
            write_json(partial / SHARDED_MARKER, {"step": step, "world_size": dist.get_world_size()})
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            complete = [c for c in output_dir.glob("checkpoint-*[0-9]") if (c / SHARDED_MARKER).is_file()]
            for folder in sorted(complete, key=checkpoint_step)[:-keep] if keep > 0 else []:
                shutil.rmtree(folder)
        dist.barrier()

    def complete_model(self, model):
        """The full weights gathered (every process joins) into an unsharded copy, on rank 0."""
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return unsharded_copy(model, full) if self.is_main_process else None

    def end(self) -> None:
        pass


Job = Accelerated | ShardedAtLoad


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
    status = run_script(main)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(status)
