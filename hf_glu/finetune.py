"""What the fine-tuning recipes share: their command line, their start (the model, or a source checkpoint of any
supported family converted on the spot, and the packed train/eval blocks), the distillation loss, checkpoint
discovery, the final save and push.

The recipes in ``recipes/`` stay short by calling these; the training loops themselves (Trainer or a
plain Accelerate loop) live in the recipes, where users copy and edit them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DistributedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
)

from .bad_input import OneLineParser, PositiveInt
from .glu import VARIANTS
from .positions import max_positions
from .training_data import STREAM_EVAL_DOCUMENTS, build_block_datasets

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
IGNORE_INDEX = -100


def load_model_and_tokenizer(
    model: str | Path | None = None,
    convert_from: str | Path | None = None,
    variant: str = "swiglu",
    init: str = "preserve",
    distributed_config: DistributedConfig | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer: from the checkpoint folder ``model``, or by converting the checkpoint
    ``convert_from`` (GPT-2 or any other supported family) to ``variant`` (its tokenizer is used). Exactly one
    must be given. ``distributed_config`` shards ``model`` at load time (tensor parallel and/or FSDP2, under
    torchrun); a conversion happens in one process's memory, so it cannot be sharded that way."""
    check_one_model(model, convert_from)
    if model is not None:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, distributed_config=distributed_config)
        return loaded, _tokenizer(model)
    if distributed_config is not None:
        raise ValueError(
            "a conversion (--convert-from) cannot be sharded at load time; convert first, then pass --model"
        )
    from .convert import convert_checkpoint
    from .convert.source import source_folder

    # The files a conversion may read are checked before the tokenizer reads any (it is saved with the model).
    tokenizer = _tokenizer(source_folder(convert_from))
    converted = convert_checkpoint(
        convert_from, variant=variant, init=init, torch_dtype=torch.float32, tokenizer=tokenizer
    )
    return converted, tokenizer


def check_one_model(model: str | Path | None, convert_from: str | Path | None) -> None:
    """A run starts from exactly one model: a GLU checkpoint, or a source converted on the spot."""
    if (model is None) == (convert_from is None):
        raise ValueError("pass exactly one of --model DIR or --convert-from SOURCE_DIR")


def _tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"no tokenizer could be loaded from {str(folder)!r}; the folder needs its tokenizer files"
        ) from error


def load_teacher(source: str | Path, student: PreTrainedModel) -> PreTrainedModel:
    """The frozen model to distil from; its vocabulary must match the student's token for token."""
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval().requires_grad_(False)
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"--distill-from {str(source)!r} has a vocabulary of {teacher_vocab} tokens, the model {student_vocab}; "
            "distillation needs the same tokenizer (e.g. the model this one was converted from)"
        )
    return teacher


def build_datasets_from_args(
    tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, *, rank: int = 0, world_size: int = 1
):
    """Packed train and held-out blocks (``training_data.build_block_datasets``) as the data options of
    ``finetune_arg_parser``'s command line describe them.

    A stream never ends (``training_data.endless_stream``): a run is one pass that ``--max-steps`` ends. It is
    split into ``world_size`` parts, this process reading part ``rank``; under Accelerate leave it whole:
    Accelerate gives each process its own batches when they are not dispatched."""
    return build_block_datasets(
        tokenizer,
        args.block_size,
        train_file=args.train_file,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        text_column=args.text_column,
        eval_fraction=args.eval_fraction,
        streaming=args.streaming,
        eval_documents=args.eval_documents or STREAM_EVAL_DOCUMENTS,
        shuffle_buffer=args.shuffle_buffer or 0,
        seed=args.seed,
        endless=True,
        rank=rank,
        world_size=world_size,
        num_proc=args.preprocessing_workers,
        cache_dir=args.data_cache_dir,
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    ce_loss: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``(1 - alpha) * ce_loss + alpha * T² * KL(teacher ‖ student)`` over the positions that predict a
    label (labels are unshifted, as the model's loss takes them).

    The KL term is summed over tokens and divided by ``num_items_in_batch`` when given (the target-token
    count of the whole accumulated batch, which is how ``ce_loss`` was normalised then), else by this
    batch's count: either way both terms weigh every token alike, so gradient accumulation stays exact.
    """
    check_distillation(alpha, temperature)
    mask = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    kl_sum = F.kl_div(student, teacher, log_target=True, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if torch.is_tensor(count):
        count = count.to(kl_sum.device)
    return (1 - alpha) * ce_loss + alpha * temperature**2 * kl_sum / count


def check_distillation(alpha: float, temperature: float) -> None:
    """The KL term's weight (``--kd-alpha``) and temperature (``--kd-temperature``), each with what it accepts."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--kd-alpha={alpha!r} is invalid; expected a number in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"--kd-temperature={temperature!r} is invalid; expected a number > 0")


class DistillationTrainer(Trainer):
    """A Trainer whose training loss adds a KL term towards a frozen teacher's logits; evaluation loss
    stays the plain cross-entropy, so eval perplexity compares with runs without distillation."""

    def __init__(self, *args, teacher: PreTrainedModel, kd_alpha: float, kd_temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ce_loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            teacher_logits = self._teacher_logits(inputs)
            # super() multiplied the CE by the process count when num_items_in_batch spans all processes
            # (DDP then averages gradients); undo it so both terms are normalised alike, then redo it.
            scale = self._data_parallel_scale(num_items_in_batch)
            loss = scale * distillation_loss(
                outputs.logits,
                teacher_logits,
                inputs["labels"],
                ce_loss / scale,
                alpha=self.kd_alpha,
                temperature=self.kd_temperature,
                num_items_in_batch=num_items_in_batch,
            )
        else:
            loss = ce_loss
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        input_ids = inputs["input_ids"]
        if self.teacher.device != input_ids.device:
            self.teacher.to(input_ids.device)
        return self.teacher(input_ids=input_ids, attention_mask=inputs.get("attention_mask")).logits

    def _data_parallel_scale(self, num_items_in_batch) -> int:
        # Mirrors the condition under which Trainer.compute_loss rescales the model's loss.
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes
        return 1


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token cross-entropy and target count (float32), for exact perplexity
    when examples are gathered from several processes."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1).float()


def perplexity_from_loss(loss: float) -> float:
    """``exp(loss)``, infinite rather than an OverflowError for a diverged run."""
    return math.exp(loss) if loss < 700 else math.inf


def latest_checkpoint(output_dir: str | Path, complete_marker: str | None = None) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N, skipping any that lacks ``complete_marker`` (a
    file written last, so a folder cut short by a killed run is never resumed from)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
        if complete_marker is None or (path / complete_marker).is_file()
    ]
    return max(found)[1] if found else None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The N of a ``checkpoint-N`` folder."""
    match = CHECKPOINT_PATTERN.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{str(checkpoint)!r} is not a checkpoint folder; expected a name like 'checkpoint-100'")
    return int(match.group(1))


def check_block_size(block_size: int, model: PreTrainedModel) -> None:
    """``--block-size`` must fit the model: at least 2 tokens (one to predict the next) and no more than its
    position embeddings cover (a longer block fails at the first forward with an IndexError)."""
    positions = max_positions(model.config)
    if block_size < 2 or (positions is not None and block_size > positions):
        most = f" and <= {positions}, the model's position limit" if positions is not None else ""
        raise ValueError(f"--block-size={block_size} is invalid; expected an integer >= 2{most}")


def check_one_batch(blocks: int, batch_size: int, processes: int, block_size: int) -> None:
    """A loop that drops the last, partial batch needs at least one full batch on every process."""
    if blocks < batch_size * processes:
        raise ValueError(
            f"the train split has {blocks} block(s) of {block_size} tokens, fewer than one batch of --batch-size "
            f"{batch_size} on each of {processes} process(es); use more text, a smaller --batch-size or --block-size"
        )


def check_tensor_parallel(model: str | Path, tp_size: int) -> None:
    """Tensor parallelism splits the attention heads between processes: refuse a degree that does not divide
    them before any process loads weights (Transformers would fail only at the first forward)."""
    config = AutoConfig.from_pretrained(model)
    for what, count in (("attention heads", "num_attention_heads"), ("key/value heads", "num_key_value_heads")):
        heads = getattr(config, count, None)
        if isinstance(heads, int) and heads % tp_size:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(
                f"--tp-size={tp_size} does not divide the {heads} {what} of {str(model)!r}; expected one of {divisors}"
            )


# Files of a checkpoint that torch.save wrote (zip archives since torch 1.6) or safetensors holds.
_TORCH_SUFFIXES = {".bin", ".pt", ".pth", ".pkl"}


def check_checkpoint(checkpoint: str | Path) -> None:
    """Check every weights and state file of ``checkpoint`` (safetensors headers against the file size, torch
    archives' directories, JSON parsed) before a run resumes from it, so a damaged checkpoint is refused
    in one line naming the file rather than by a traceback from deep inside the load."""
    for path in sorted(Path(checkpoint).rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in _TORCH_SUFFIXES:
                # The central directory (at the end) only: a file cut short has none. Reading every member
                # against its CRC would read an optimizer state of many GB once more.
                zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (SafetensorError, zipfile.BadZipFile, ValueError, OSError) as error:
            raise ValueError(
                f"checkpoint file {str(path)!r} is damaged ({error}); delete {Path(checkpoint).name} to resume "
                "from an earlier checkpoint, or run without --resume"
            ) from error


# Prefixes a wrapper adds to a model's tensor names (DDP, torch.compile): the same tensors either way.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _saved_shapes(checkpoint: Path) -> tuple[dict[str, tuple[int, ...]], bool] | None:
    """The model tensors a checkpoint holds, ``{name: shape}``, and whether they are a PEFT adapter's only; None
    when it holds none this can read: a torch.distributed.checkpoint (``.metadata``: the sharded recipe's, global
    shapes), Accelerate's ``model.safetensors`` or a Trainer's ``model.safetensors``/``adapter_model.safetensors``."""
    if (checkpoint / ".metadata").is_file():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entries = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        shapes = {name.removeprefix("model."): tuple(entry.size) for name, entry in entries.items()
                  if name.startswith("model.") and isinstance(entry, TensorStorageMetadata)}  # fmt: skip
        return shapes, False
    for file_name, adapter in (("model.safetensors", False), ("adapter_model.safetensors", True)):
        if (checkpoint / file_name).is_file():
            with safe_open(str(checkpoint / file_name), "pt") as weights:
                shapes = {_unwrapped_name(k): tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
            return shapes, adapter
    return None


def _model_shapes(model: torch.nn.Module, adapter: bool) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """``{name: shape}`` of what ``model`` may save, and the names it must save: its adapter's tensors as PEFT
    names them for an adapter file; else every tensor of its state dict, a tied one under either name but
    needed once (under the name ``named_parameters`` keeps)."""
    if adapter:
        from peft import get_peft_model_state_dict

        shapes = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}
        return shapes, set(shapes)
    shapes = {_unwrapped_name(name): tuple(t.shape) for name, t in model.state_dict().items()}
    needed = {_unwrapped_name(name) for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    return shapes, needed & set(shapes)


def check_checkpoint_fits(checkpoint: str | Path, model: torch.nn.Module) -> None:
    """Refuse to resume ``model`` from a ``checkpoint`` another model wrote (another size, family, or LoRA where
    there was none), in one line naming the checkpoint and the first difference, before its load fails deep in
    torch (a size mismatch, or the optimizer's "parameter group that doesn't match"). A tensor saved under
    another name (a family's save-time renaming, e.g. GPT-NeoX's lm_head as embed_out) pairs up by shape."""
    checkpoint = Path(checkpoint)
    found = _saved_shapes(checkpoint)
    if found is None:
        return
    saved, adapter = found
    if adapter and not isinstance(model, PeftModel):
        _refuse(checkpoint, f"it holds a LoRA adapter ({next(iter(saved), 'no tensor')}, …), this model none")
    own, needed = _model_shapes(model, adapter)
    difference = next((f"{name} is {list(shape)} there, {list(own[name])} here"
                       for name, shape in saved.items() if name in own and own[name] != shape), None)  # fmt: skip
    unsaved = {name: own[name] for name in sorted(needed) if name not in saved}
    foreign = []
    for name in sorted(set(saved) - set(own)):
        twin = next((other for other, shape in unsaved.items() if shape == saved[name]), None)
        if twin is None:
            foreign.append(name)
        else:
            del unsaved[twin]
    if difference is None and foreign:
        difference = f"it holds {len(foreign)} tensor(s) this model has no place for, e.g. {foreign[0]} " + str(
            list(saved[foreign[0]])
        )
    if difference is None and unsaved:
        first = next(iter(unsaved))
        difference = f"it lacks {len(unsaved)} of this model's tensors, e.g. {first} {list(unsaved[first])}"
    if difference is not None:
        _refuse(checkpoint, difference)


def _refuse(checkpoint: Path, difference: str) -> None:
    raise ValueError(
        f"checkpoint {str(checkpoint)!r} was saved from another model: {difference}; resume with the model it was "
        "saved from (and the same --lora), or run without --resume or into another --output-dir"
    )


def sweep_partial_checkpoints(output_dir: str | Path) -> None:
    """Remove the ``checkpoint-N.partial`` folders a killed run left: never resumed from, and one in the way
    of this run's save of the same step."""
    for folder in Path(output_dir).glob("checkpoint-*.partial"):
        shutil.rmtree(folder)


def save_final(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    adapter_folder: str | Path | None = None,
    state_dict: dict | None = None,
) -> PreTrainedModel:
    """Save a complete checkpoint (weights, config, code, tokenizer) into ``folder``. A PEFT model first
    saves its adapter into ``adapter_folder`` and is then merged, so ``folder`` loads without PEFT.
    ``state_dict`` is the gathered full state dict when the model is sharded (FSDP, ZeRO-3)."""
    if isinstance(model, PeftModel):
        if adapter_folder is None:
            raise ValueError("a LoRA model needs an adapter_folder to save its adapter into")
        model.save_pretrained(adapter_folder)
        model = model.merge_and_unload()
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return model


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (by name, float32 bytes): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def finetune_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags both recipes accept, so the Trainer and Accelerate scripts take the same job description."""
    parser = OneLineParser(description=description)
    source = parser.add_argument_group("model (exactly one)")
    source.add_argument("--model", help="GLU checkpoint folder or Hub id (its tokenizer is used)")
    source.add_argument(
        "--convert-from", help="source checkpoint of any supported family to convert first (its tokenizer is used)"
    )
    source.add_argument("--variant", default="swiglu", choices=sorted(VARIANTS), help="GLU variant for --convert-from")
    source.add_argument("--init", default="preserve", choices=["preserve", "random"], help="conversion init scheme")

    data = parser.add_argument_group("data (default: the built-in corpus)")
    data.add_argument("--train-file", help=".txt (paragraphs) or .jsonl (one JSON object with --text-column a line)")
    data.add_argument("--dataset", help="a `datasets` dataset name")
    data.add_argument("--dataset-config", help="the dataset's config name")
    data.add_argument("--text-column", default="text")
    data.add_argument("--eval-fraction", type=float, default=0.1, help="tail of the text held out for evaluation")
    data.add_argument(
        "--streaming", action="store_true", help="read the training data lazily (corpora larger than memory)"
    )
    data.add_argument(
        "--eval-documents",
        action=PositiveInt,
        help=f"with --streaming: the first N documents are held out (default {STREAM_EVAL_DOCUMENTS})",
    )
    data.add_argument(
        "--shuffle-buffer",
        action=PositiveInt,
        help="with --streaming: draw blocks at random from N (default: in order)",
    )
    data.add_argument("--preprocessing-workers", action=PositiveInt, help="processes that tokenize (map-style data)")
    data.add_argument("--data-cache-dir", help="where `datasets` caches tokenized blocks (default: its own cache)")
    data.add_argument("--block-size", type=int, default=512, help="tokens per packed training example")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", required=True, help="checkpoints, final/ (and adapter/ with --lora) go here")
    train.add_argument("--max-steps", action=PositiveInt, default=1000, help="optimizer steps")
    train.add_argument("--batch-size", action=PositiveInt, default=8, help="examples per device per micro-batch")
    train.add_argument("--grad-accum", action=PositiveInt, default=1, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    train.add_argument("--logging-steps", action=PositiveInt, default=10)
    train.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    train.add_argument("--save-steps", action=PositiveInt, default=500, help="write checkpoint-N every N steps")
    train.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (oldest deleted)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    train.add_argument("--seed", type=int, default=0)

    lora = parser.add_argument_group("LoRA (PEFT; hf_glu registers the default target modules)")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=int, default=16)
    lora.add_argument("--lora-dropout", type=float, default=0.0)

    kd = parser.add_argument_group("distillation (for approximate conversions)")
    kd.add_argument(
        "--distill-from", help="teacher model (e.g. the conversion's source) whose logits the KL term follows"
    )
    kd.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the KL term: (1-A)·CE + A·T²·KL")
    kd.add_argument("--kd-temperature", type=float, default=1.0)

    sharding = parser.add_argument_group(
        "sharding (under torchrun, one process per device; tp-size x fsdp-size must equal the process count)"
    )
    sharding.add_argument(
        "--tp-size", action=PositiveInt, default=1, help="tensor-parallel degree (Transformers' TP plan)"
    )
    sharding.add_argument(
        "--fsdp-size", action=PositiveInt, default=1, help="FSDP2 degree: parameters sharded over N processes"
    )

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO", help="push the final folder to this Hub repo id")
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    return parser


def check_finetune_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations argparse cannot express, naming what is accepted."""
    _refuse_with(parser, check_one_model, args.model, args.convert_from)
    if args.train_file and args.dataset:
        parser.error("pass either --train-file or --dataset, not both")
    for name in ("eval_documents", "shuffle_buffer"):  # stream options: a map-style run would ignore them
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value is not None and not args.streaming:
            parser.error(f"{flag} applies to --streaming only (map-style data: --eval-fraction, shuffled each epoch)")
    _refuse_with(parser, check_distillation, args.kd_alpha, args.kd_temperature)
    _check_sharding_args(parser, args)


def _refuse_with(parser: argparse.ArgumentParser, check: Callable[..., None], *values) -> None:
    """Run one of the library's checks before anything loads (it runs again where the values are used, for its
    other callers), its ValueError becoming the parser's one-line error."""
    try:
        check(*values)
    except ValueError as e:
        parser.error(str(e))


def _check_sharding_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not is_sharded(args):
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp_size * args.fsdp_size != world_size:
        parser.error(
            f"--tp-size={args.tp_size} x --fsdp-size={args.fsdp_size} must equal the number of processes "
            f"({world_size}); launch with torchrun --nproc_per_node {args.tp_size * args.fsdp_size}"
        )
    # Not shown to work on a model sharded at load time (and the adapter merge needs full weights).
    unsupported = {"--convert-from": args.convert_from, "--lora": args.lora, "--distill-from": args.distill_from}
    for flag, value in unsupported.items():
        if value:
            parser.error(f"{flag} is not supported with --tp-size/--fsdp-size; accepted: --model DIR")


def is_sharded(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a model sharded at load time (``--tp-size``/``--fsdp-size`` above 1)."""
    return args.tp_size > 1 or args.fsdp_size > 1


def distributed_config_from_args(args: argparse.Namespace) -> DistributedConfig | None:
    """Transformers' load-time sharding for ``--tp-size``/``--fsdp-size``; None for an unsharded run."""
    if not is_sharded(args):
        return None
    return DistributedConfig(tp_size=args.tp_size, fsdp_size=args.fsdp_size)


def lora_config(args: argparse.Namespace) -> LoraConfig:
    """A LoRA config without target_modules: PEFT takes hf_glu's registered defaults for model_type glu."""
    return LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)


def parse_finetune_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The recipe's command line, parsed by ``parser`` (``finetune_arg_parser``'s, with the recipe's own flags added)
    and checked (``check_finetune_args``)."""
    args = parser.parse_args()
    check_finetune_args(parser, args)
    return args


def start_finetuning(
    args: argparse.Namespace,
    *,
    data_part: Callable[[], tuple[int, int]] = lambda: (0, 1),
    batch_processes: int | None = None,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
):
    """What every recipe does first, after seeding, as its command line asks: the model and its tokenizer (converted
    on the spot for ``--convert-from``, sharded at load time for ``--tp-size``/``--fsdp-size``), checked against
    ``--block-size``; the packed train and held-out blocks (``data_part()`` is asked once the model is loaded, which
    joins the process group of a run sharded at load time: ``(rank, parts)``, a stream split into ``parts``, this
    process reading part ``rank``), with a full batch for each of ``batch_processes`` when given; LoRA for ``--lora``;
    the frozen teacher for ``--distill-from``. Returns ``(model, tokenizer, teacher or None, train_data,
    eval_data)``."""
    if args.tp_size > 1:
        check_tensor_parallel(args.model, args.tp_size)
    model, tokenizer = load_model_and_tokenizer(
        args.model, args.convert_from, args.variant, args.init, distributed_config=distributed_config_from_args(args)
    )
    check_block_size(args.block_size, model)
    rank, parts = data_part()
    with main_process_first():  # a dataset download (--dataset) happens once
        train_data, eval_data = build_datasets_from_args(tokenizer, args, rank=rank, world_size=parts)
    if batch_processes is not None and not args.streaming:  # a stream was split above, before packing
        check_one_batch(len(train_data), args.batch_size, batch_processes, args.block_size)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args))
    teacher = load_teacher(args.distill_from, model) if args.distill_from else None
    return model, tokenizer, teacher, train_data, eval_data


def push_final(final: str | Path, args: argparse.Namespace) -> None:
    """Push the final folder to ``--push-to-hub`` (``--private``), when asked; from one process only."""
    if not args.push_to_hub:
        return
    from .hub import push_checkpoint  # imported here: only a pushing run needs the Hub client

    push_checkpoint(final, args.push_to_hub, private=args.private)
    print(f"pushed {final} to {args.push_to_hub}")
