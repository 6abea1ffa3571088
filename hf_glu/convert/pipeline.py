"""The conversion itself: load and check the source, map config and weights, measure fidelity."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..cards import render_conversion_card
from ..data import builtin_corpus, split_train_eval
from .errors import ConversionError
from .init_schemes import CALIBRATED_VARIANTS, UnitMap, fit_unit_map
from .report import LayerStats, compare, mlp_weights, record_source
from .save import atomic_folder, check_destination, writing_to
from .source import Source, load_source
from .surgery import Surgery, build_model, surgery_for
from .width import (
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_RIDGE_ALPHA,
    IMPORTANCE,
    calibration_batch,
    fit_reduced_mlps,
    glu_biases,
    glu_mlp_parameters,
    matched_width,
    recovery_command,
    source_mlp_parameters,
    source_mlp_shape,
)

DEFAULT_EVAL_TOKENS = 256  # 256 × a 50257-word vocabulary: 12.9M logits compared; a 124M model scores it in seconds
CALIBRATION_TOKENS = 512
# The default texts: the head of the built-in corpus calibrates, the rest evaluates, so the
# calibrated fits are never scored on the text they were fitted to.
_DEFAULT_TEXT_CHARS = 40_000
_MAX_FIT_SAMPLES = 200_000
_DEFAULT_WINDOW = 1024  # evaluation window: the model's context, at most this
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Conversion:
    model: PreTrainedModel
    report: dict
    source: Source


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``, a torch dtype or its name (``"bfloat16"``…); anything else is a ConversionError."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not supported; expected one of {list(_DTYPES)}")
    return _DTYPES[name]


def _token_ids(text: str | None, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, n: int) -> torch.Tensor:
    if tokenizer is None:
        # No tokenizer came with the source: deterministic random tokens still compare the two models.
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (1, n), generator=generator)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :n]
    if ids.shape[-1] < 2:
        raise ConversionError("the evaluation text is too short: it needs at least 2 tokens")
    if int(ids.max()) >= vocab_size:
        raise ConversionError(
            f"the tokenizer produces ids up to {int(ids.max())}, beyond the model's vocab_size={vocab_size}"
        )
    return ids


def evaluation_ids(
    eval_text: str | None, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, eval_tokens: int
) -> torch.Tensor:
    """The token ids the fidelity report scores, whichever route measures it: ``eval_text``, else the default
    evaluation text (random ids without a tokenizer)."""
    _, default_eval = split_train_eval(builtin_corpus(_DEFAULT_TEXT_CHARS), 0.5)
    return _token_ids(eval_text if eval_text is not None else default_eval, tokenizer, vocab_size, eval_tokens)


def evaluation_window(surgery: Surgery, config) -> int:
    """The fidelity report's window: the model's context, at most ``_DEFAULT_WINDOW`` tokens."""
    return min(surgery.max_positions(config) or _DEFAULT_WINDOW, _DEFAULT_WINDOW)


@torch.inference_mode()
def _record_preactivations(
    model: PreTrainedModel, surgery: Surgery, ids: torch.Tensor, max_length: int
) -> list[torch.Tensor]:
    """Each layer's MLP pre-activation (its input projection's output) on ``ids``, subsampled to at most
    ``_MAX_FIT_SAMPLES`` values."""
    layers = surgery.source_layers(model)
    recorded: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        surgery.source_mlp(layer)[0].register_forward_hook(
            lambda m, a, out, r=r: r.append(out.detach().float().reshape(-1))
        )
        for r, layer in zip(recorded, layers, strict=True)
    ]
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, ids.shape[-1], max_length):
            model(ids[:, begin : begin + max_length])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    generator = torch.Generator().manual_seed(0)
    layers_z = []
    for values in recorded:
        z = torch.cat(values)
        if z.numel() > _MAX_FIT_SAMPLES:
            z = z[torch.randperm(z.numel(), generator=generator)[:_MAX_FIT_SAMPLES]]
        layers_z.append(z)
    return layers_z


def convert(
    source: str | Path | PreTrainedModel,
    variant: str = "swiglu",
    init: str = "preserve",
    intermediate_size: int | None = None,
    torch_dtype: str | torch.dtype | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    eval_text: str | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seed: int = 0,
    match_params: bool = False,
    calibration_text: str | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
) -> Conversion:
    """Convert ``source`` and measure it; see :func:`hf_glu.convert.convert_gpt2` for the arguments."""
    dtype = parse_dtype(torch_dtype)
    _check_width_options(init, intermediate_size, match_params, calibration_text, calibration_tokens)
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 2:
        raise ConversionError(f"eval_tokens={eval_tokens!r} is invalid; expected an integer >= 2")
    if intermediate_size is not None and (
        isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or intermediate_size < 1
    ):
        raise ConversionError(f"intermediate_size={intermediate_size!r} is invalid; expected an integer >= 1")
    loaded = load_source(source)
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    if eval_text is not None and loaded.tokenizer is None:
        raise ConversionError(
            "eval_text was given but the source has no tokenizer to read it with; add the tokenizer files to "
            "the source folder (or pass tokenizer=), or leave eval_text out (random token ids are then used)"
        )
    src = loaded.model
    model_type = src.config.model_type
    surgery = surgery_for(model_type)
    hidden, source_width = source_mlp_shape(surgery, src)
    source_parameters = {"mlp": source_mlp_parameters(surgery, src), "total": _count(src)}
    if match_params:  # the biases the GLU will have count too: they follow from the config, whatever its width
        biases = glu_biases(surgery.config(src, variant, init, None))
        per_layer = source_parameters["mlp"] // len(surgery.source_layers(src))
        intermediate_size = matched_width(per_layer, hidden, source_width, biases)
    config = surgery.config(src, variant, init, intermediate_size)
    reduced = init == "preserve" and config.glu_width < source_width
    max_length = evaluation_window(surgery, src.config)

    map_fit_text, _ = split_train_eval(builtin_corpus(_DEFAULT_TEXT_CHARS), 0.5)
    vocab = config.vocab_size
    eval_ids = evaluation_ids(eval_text, loaded.tokenizer, vocab, eval_tokens)
    num_layers = len(surgery.source_layers(src))
    activation = surgery.activation(src)

    unit_maps: list[UnitMap] | None = None
    if init == "preserve":
        if variant in CALIBRATED_VARIANTS:
            calibration_ids = _token_ids(map_fit_text, loaded.tokenizer, vocab, CALIBRATION_TOKENS)
            recorded = _record_preactivations(src, surgery, calibration_ids, max_length)
            unit_maps = [fit_unit_map(variant, activation, config.glu_params, z) for z in recorded]
        else:  # a fixed map, the same for every layer
            unit_maps = [fit_unit_map(variant, activation, config.glu_params)] * num_layers
    fits = None
    if reduced:  # before the source is consumed: the fit runs it on calibration text
        text = calibration_text if calibration_text is not None else _default_calibration_text()
        calibration = calibration_batch(
            _calibration_ids(text, loaded.tokenizer, vocab, calibration_tokens), max_length
        )
        down_bias = glu_biases(config)[2]
        fits = fit_reduced_mlps(src, surgery, unit_maps, variant, config.glu_params, config.glu_width, calibration,
                                dtype or next(src.parameters()).dtype, down_bias)  # fmt: skip

    # The source's pass comes first: a source read from disk is ours alone, so the conversion may then
    # consume it, block by block, and it is never whole in memory beside the converted model.
    record = record_source(src, surgery, eval_ids, max_length, max_length // 2)
    owned = not isinstance(source, PreTrainedModel)
    target = surgery.target_class(src)
    dtype = dtype or next(src.parameters()).dtype
    src_name, src_class = loaded.name or type(src).__name__, type(src).__name__
    # A width-reduced MLP keeps a subset of the units and re-fits down: no unit-for-unit reference remains.
    stats = [LayerStats(unit_maps is not None and not reduced) for _ in range(num_layers)]

    def layer_done(i: int, source_layer: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        # The preserved MLP is measured against the source's while both exist; its records are then freed.
        reference = partial(surgery.preactivation, source_layer)
        stats[i].measure(record.mlp_io[i], {k: v.to(dtype) for k, v in weights.items()}, variant,
                         config.glu_params, reference)  # fmt: skip
        record.mlp_io[i] = []

    mlps = [fit.weights for fit in fits] if fits is not None else None
    state_dict = surgery.weights(src, config, unit_maps, owned, layer_done if unit_maps is not None else None, mlps)
    if owned:
        loaded.model = src = None  # consumed by the conversion
    # Built as reloading the saved checkpoint builds it: parameters in `dtype`, buffers in their own dtype.
    model = build_model(target, config, state_dict, dtype, seed=None if unit_maps is not None else seed)
    del state_dict
    model.config.dtype = dtype
    if unit_maps is None:  # random MLP weights exist only now; there is no unit-for-unit reference
        for i, mlp in enumerate(surgery.glu_mlps(model)):
            stats[i].measure(record.mlp_io[i], mlp_weights(mlp), variant, config.glu_params)
            record.mlp_io[i] = []

    report = {
        "source": src_name,
        "source_class": src_class,
        "source_model_type": model_type,
        "converted_class": type(model).__name__,
        "source_activation": activation,
        "source_projections": list(surgery.projections),  # the dense MLP's input and output projections
        "variant": variant,
        "init": init,
        "intermediate_size": config.glu_width,
        # A bias-free source MLP whose exact map needs a constant up path gets an up bias (said in the card).
        "up_bias_added": bool(getattr(config, "glu_up_bias", False)) and not getattr(config, "glu_bias", True),
        "dtype": str(model.dtype).removeprefix("torch."),
        "eval_data": describe_eval(eval_text, loaded.tokenizer),
        **compare(record, model, stats, unit_maps),
    }
    glu_mlp = sum(p.numel() for mlp in surgery.glu_mlps(model) for p in mlp.parameters())
    report["parameters"] = {
        "source": source_parameters,
        "converted": {"mlp": glu_mlp, "total": _count(model)},
        "counting": "each parameter tensor once (a tied head counts once); MLP: the dense MLP's two projections "
        "(weights and biases) against gate_proj, up_proj and down_proj with the biases the GLU MLP has",
    }
    if fits is not None:
        for layer, fit in zip(report["layers"], fits, strict=True):
            layer["calibration_mlp_relative_error"] = fit.calibration_relative_error
        report["width"] = {
            "source_intermediate_size": source_width,
            "intermediate_size": config.glu_width,
            "chosen_by": "match_params" if match_params else "intermediate_size",
            "importance": IMPORTANCE,
            "down_fit": f"ridge least squares (lambda = {DEFAULT_RIDGE_ALPHA} x the Gram matrix's mean diagonal, "
            "intercept unpenalised) of the source MLP's output on the kept units' outputs, layer by layer, each "
            "layer fed the already-converted layers' outputs",
            "calibration": {
                "data": _describe_calibration(calibration_text, loaded.tokenizer),
                "tokens": int(calibration.numel()),
                "windows": int(calibration.shape[0]),
            },
            "errors": "calibration_mlp_relative_error: on the calibration text, inputs from the converted layers "
            "before; mlp_relative_error: on the evaluation text, inputs from the source's layers",
            "recovery": recovery_command(src_name, "DST"),
        }
        if match_params:
            biases = glu_biases(config)
            report["width"]["match_params"] = {
                "source_mlp_per_layer": source_parameters["mlp"] // num_layers,
                "glu_mlp_per_layer": glu_mlp_parameters(hidden, config.glu_width, biases),
                "rule": f"the width N whose GLU MLP, 3·{hidden}·N weights{_bias_terms(hidden, biases)}, comes nearest "
                "the source MLP's count, rounded to a multiple of 8",
            }
    return Conversion(model=model, report=report, source=loaded)


def _bias_terms(hidden: int, biases: tuple[bool, bool, bool]) -> str:
    """The GLU MLP's bias terms in the parameter count, e.g. `` + N (gate bias) + N (up bias) + 768 (down bias)``."""
    sizes = ("N", "N", str(hidden))
    return "".join(f" + {size} ({name} bias)" for name, size, has in zip(("gate", "up", "down"), sizes, biases,
                                                                           strict=True) if has)  # fmt: skip


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_width_options(
    init: str, intermediate_size: int | None, match_params: bool, calibration_text: str | None, calibration_tokens: int
) -> None:
    """The width options' values and combinations, checked before the source is loaded."""
    if not isinstance(match_params, bool):
        raise ConversionError(f"match_params={match_params!r} is invalid; expected True or False")
    if match_params and intermediate_size is not None:
        raise ConversionError("match_params=True picks intermediate_size itself; pass one of them, not both")
    if isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 2:
        raise ConversionError(f"calibration_tokens={calibration_tokens!r} is invalid; expected an integer >= 2")
    if calibration_text is not None and (init != "preserve" or (intermediate_size is None and not match_params)):
        raise ConversionError(
            "calibration_text is used by a width-reduced preserve conversion only; expected init='preserve' with "
            "intermediate_size=N or match_params=True"
        )


def _default_calibration_text() -> str:
    """The built-in corpus without the default evaluation text, so the default report scores held-out text."""
    head = builtin_corpus(_DEFAULT_TEXT_CHARS)
    calibration, _ = split_train_eval(head, 0.5)
    return calibration + "\n\n" + builtin_corpus()[len(head) :].lstrip("\n")


def _calibration_ids(
    text: str, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, n: int
) -> torch.Tensor:
    if tokenizer is None:  # random ids, seeded apart from the evaluation's (seed 0), so they differ from them
        return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    # A token is rarely longer than 16 characters: tokenising more of a long file would be thrown away.
    return _token_ids(text[: 16 * n], tokenizer, vocab_size, n)


def _describe_calibration(calibration_text: str | None, tokenizer: PreTrainedTokenizerBase | None) -> str:
    if tokenizer is None:
        return "random token ids (the source has no tokenizer)"
    if calibration_text is None:
        return "built-in corpus (hf_glu.data.builtin_corpus) without the default evaluation text"
    return "user text"


def describe_eval(eval_text: str | None, tokenizer: PreTrainedTokenizerBase | None) -> str:
    if tokenizer is None:
        return "random token ids (the source has no tokenizer)"
    return "built-in corpus (hf_glu.data.builtin_corpus)" if eval_text is None else "user text"


def convert_checkpoint(
    source: str | Path | PreTrainedModel,
    variant: str = "swiglu",
    init: str = "preserve",
    intermediate_size: int | None = None,
    torch_dtype: str | torch.dtype | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    eval_text: str | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seed: int = 0,
    match_params: bool = False,
    calibration_text: str | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
) -> PreTrainedModel:
    """Turn a GPT-2-style model's MLPs into GLU MLPs; returns the converted model.

    A GPT-2 source becomes the matching ``GluFor*`` model; any other supported family (``hf_glu.FAMILIES``:
    gpt_neox, opt, bloom, falcon, …) becomes ``Glu<its class>``, the family's own architecture with each
    layer's MLP a GLU MLP and every other tensor unchanged.

    Args:
        source: a model instance of a supported class (``GPT2LMHeadModel``, ``GPTNeoXForCausalLM``,
            ``OPTModel``…), a local checkpoint folder, or a Hub id.
        variant: the GLU variant (``hf_glu.VARIANTS``).
        init: ``"preserve"`` (the converted model computes what the source did, exactly or within the
            variant's documented bound: see :mod:`hf_glu.convert.init_schemes`) or ``"random"``
            (fresh MLP weights; attention, embeddings and norms kept).
        intermediate_size: the GLU width. ``"random"`` takes any; ``"preserve"`` at most the source's: below
            it, each layer keeps its most important units and re-fits ``down_proj`` on calibration text
            (:mod:`hf_glu.convert.width`); equal to it, every unit is kept exactly as without it.
        torch_dtype: dtype of the result's parameters (default: the source's); buffers keep the dtype their
            class gives them (float32 rotary frequencies), so the result is what reloading its checkpoint gives.
        tokenizer: tokenizer for the calibration and evaluation text when ``source`` is an instance
            (a folder's own tokenizer is used otherwise); without one, random token ids are used.
        eval_text: text for the fidelity report (default: part of the built-in corpus).
        eval_tokens: how many tokens of it to evaluate.
        seed: seed of the random scheme's fresh weights.
        match_params: pick ``intermediate_size`` so the GLU MLP has the source MLP's parameter count (biases
            counted), rounded to a multiple of 8 (GPT-2: 2/3 of the source width).
        calibration_text: text the width-reduced ``preserve`` conversion chooses units and fits ``down_proj``
            on (default: the built-in corpus without the default evaluation text).
        calibration_tokens: how many tokens of it to use.

    The fidelity report (per-layer MLP error, max |Δlogit|, perplexities) is attached to the result as
    ``model.conversion_report``. Bad input raises :class:`hf_glu.convert.ConversionError`.
    """
    conversion = convert(
        source,
        variant,
        init,
        intermediate_size,
        torch_dtype,
        tokenizer=tokenizer,
        eval_text=eval_text,
        eval_tokens=eval_tokens,
        seed=seed,
        match_params=match_params,
        calibration_text=calibration_text,
        calibration_tokens=calibration_tokens,
    )
    conversion.model.conversion_report = conversion.report
    return conversion.model


# The GPT-2 era name of :func:`convert_checkpoint`, kept for existing callers: it converts any family too.
convert_gpt2 = convert_checkpoint


def write_checkpoint(
    conversion: Conversion, folder: Path, max_shard_size: str | int = "5GB", model_name: str | None = None
) -> None:
    """Write a complete Hub-ready checkpoint into ``folder``: weights, config with auto_map and the
    modeling code, the source's tokenizer and generation config, the report and the model card."""
    model = conversion.model
    if conversion.source.generation_config is not None and model.can_generate():
        model.generation_config = copy.deepcopy(conversion.source.generation_config)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if conversion.source.tokenizer is not None:
        conversion.source.tokenizer.save_pretrained(folder)
    # Strict JSON: a NaN or inf here is a bug (the report replaces them), so it must fail, not be written.
    report = json.dumps(conversion.report, indent=2, allow_nan=False)
    (folder / "conversion_report.json").write_text(report + "\n", encoding="utf-8")
    card = render_conversion_card(conversion.report, model_name=model_name or folder.name)
    card.save(folder / "README.md")


def convert_to_folder(
    source: str | Path | PreTrainedModel,
    dst: str | Path,
    variant: str = "swiglu",
    init: str = "preserve",
    intermediate_size: int | None = None,
    torch_dtype: str | torch.dtype | None = None,
    *,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    eval_text: str | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seed: int = 0,
    match_params: bool = False,
    calibration_text: str | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
) -> Conversion:
    """Convert ``source`` and write the checkpoint to ``dst`` atomically: ``dst`` is replaced only once
    everything is written (a non-empty ``dst`` only with ``force``); any failure leaves it untouched."""
    local = source if isinstance(source, (str, Path)) else None  # a folder or a Hub id; an instance has no files
    dst = check_destination(dst, force, local)  # before the work, so a refusal costs nothing
    conversion = convert(
        source, variant, init, intermediate_size, torch_dtype, eval_text=eval_text, eval_tokens=eval_tokens, seed=seed,
        match_params=match_params, calibration_text=calibration_text, calibration_tokens=calibration_tokens,
    )  # fmt: skip
    conversion.source.model = None  # measured already (a disk source is consumed already): free its memory
    if "width" in conversion.report:  # the recipe can now name the real destination
        conversion.report["width"]["recovery"] = recovery_command(conversion.report["source"], str(dst))
    with atomic_folder(dst, force, local) as tmp, writing_to(dst):
        write_checkpoint(conversion, tmp, max_shard_size, model_name=dst.name)
    return conversion
