"""The conversion itself: load and check the source, map config and weights, measure fidelity."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..cards import render_conversion_card
from ..data import builtin_corpus, split_train_eval
from ..jsonio import write_json
from .errors import ConversionError
from .init_schemes import CALIBRATED_VARIANTS, UnitMap, fit_unit_map
from .report import LayerStats, SourceRecord, compare, mlp_weights, record_source
from .save import atomic_folder, check_destination, writing_to
from .source import Source, load_source
from .surgery import Surgery, build_model, surgery_for
from .width import (
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_RIDGE_ALPHA,
    IMPORTANCE,
    LayerFit,
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
# Tokens of the built-in corpus a calibrated variant's per-layer unit map is fitted on (not --calibration-tokens,
# which sizes a width change's fit: width.DEFAULT_CALIBRATION_TOKENS).
UNIT_MAP_FIT_TOKENS = 512
# The default texts: the head of the built-in corpus calibrates, the rest evaluates, so the
# calibrated fits are never scored on the text they were fitted to.
_DEFAULT_TEXT_CHARS = 40_000
_MAX_FIT_SAMPLES = 200_000
_DEFAULT_WINDOW = 1024  # evaluation window: the model's context, at most this
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Conversion:
    """A conversion's result: the converted model, its fidelity report, and the loaded source (its tokenizer
    and generation config go into the checkpoint; its model is ``None`` once consumed)."""

    model: PreTrainedModel
    report: dict
    source: Source


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion, written once: :func:`convert`, :func:`convert_checkpoint` and
    :func:`convert_to_folder` take these as their arguments (the first four by position or name, the rest by
    name) and build one of these from them. Documented at :func:`convert_checkpoint`."""

    variant: str = "swiglu"
    init: str = "preserve"
    intermediate_size: int | None = None
    torch_dtype: str | torch.dtype | None = None
    _: KW_ONLY
    tokenizer: PreTrainedTokenizerBase | None = None
    eval_text: str | None = None
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    seed: int = 0
    match_params: bool = False
    calibration_text: str | None = None
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS


T = TypeVar("T")


def _takes_options(wrapper: Callable[..., T]) -> Callable[..., T]:
    """Give an entry point that forwards ``*args, **options`` to :class:`ConvertOptions` the signature it
    accepts (its own parameters with the options in their place), so ``help()`` and editors list every
    option by name."""
    signature = inspect.signature(wrapper)
    own = list(signature.parameters.values())
    fields = list(inspect.signature(ConvertOptions).parameters.values())
    star = next(i for i, p in enumerate(own) if p.kind is p.VAR_POSITIONAL)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            *own[:star],
            *(p for p in fields if p.kind is p.POSITIONAL_OR_KEYWORD),
            *(p for p in own[star:] if p.kind is p.KEYWORD_ONLY),
            *(p for p in fields if p.kind is p.KEYWORD_ONLY),
        ]
    )
    return wrapper


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
    _, default_eval, _ = _default_texts()
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


@_takes_options
def convert(source: str | Path | PreTrainedModel, *args, **options) -> Conversion:
    """Convert ``source`` and measure it, keeping the loaded source beside the result (the tokenizer and
    generation config a checkpoint takes along). Arguments as :func:`convert_checkpoint`'s."""
    return _convert(source, ConvertOptions(*args, **options))


def _convert(source: str | Path | PreTrainedModel, options: ConvertOptions) -> Conversion:
    """The conversion, step by step; each step's docstring says why it is a step of its own."""
    dtype = check_options(options)
    loaded = _load(source, options)
    plan = _plan(loaded, options, dtype)
    calibration = _calibrate(loaded, plan, options)
    owned = not isinstance(source, PreTrainedModel)  # a folder or a Hub id is read for this conversion alone
    model, record, stats = _transplant(loaded, plan, calibration, options, owned)
    measured = _measure(model, plan, calibration, options, record, stats)
    report = _report(model, loaded, plan, calibration, options, measured)
    return Conversion(model=model, report=report, source=loaded)


def keyword(option: str, *value: object) -> str:
    """How a message names an option of the Python API: ``intermediate_size=0``, or ``intermediate_size``."""
    return f"{option}={value[0]!r}" if value else option


def check_options(options: ConvertOptions, name: Callable[..., str] = keyword) -> torch.dtype | None:
    """The options' values and combinations, before the source is loaded: a refusal then costs nothing.
    Returns the dtype asked for (``None``: the source's). ``name(option, *value)`` spells an option in the
    messages as the caller's user writes it (:func:`keyword`; the CLI's ``--flag value``)."""
    dtype = parse_dtype(options.torch_dtype)
    _check_width_options(options, name)
    eval_tokens, intermediate_size = options.eval_tokens, options.intermediate_size
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 2:
        raise ConversionError(f"{name('eval_tokens', eval_tokens)} is invalid; expected an integer >= 2")
    if intermediate_size is not None and (
        isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or intermediate_size < 1
    ):
        raise ConversionError(f"{name('intermediate_size', intermediate_size)} is invalid; expected an integer >= 1")
    return dtype


def _load(source: str | Path | PreTrainedModel, options: ConvertOptions) -> Source:
    """The source, loaded and validated, with the tokenizer that reads its texts: ``options.tokenizer``
    overrides the folder's own. Text without a tokenizer to read it is refused here, before any work."""
    loaded = load_source(source)
    if options.tokenizer is not None:
        loaded.tokenizer = options.tokenizer
    if options.eval_text is not None and loaded.tokenizer is None:
        raise ConversionError(
            "eval_text was given but the source has no tokenizer to read it with; add the tokenizer files to "
            "the source folder (or pass tokenizer=), or leave eval_text out (random token ids are then used)"
        )
    return loaded


@dataclass
class _Plan:
    """What the source and the options decide before any weight moves; read by every later step. It holds
    no reference to the source model, so the transplant can consume a source read from disk."""

    surgery: Surgery
    config: PretrainedConfig  # the converted model's
    name: str  # the source's, for the report and the recovery command
    model_type: str
    source_class: str
    hidden: int
    source_width: int
    source_parameters: dict[str, int]
    num_layers: int
    activation: str
    dtype: torch.dtype  # of the converted parameters
    reduced: bool  # a preserve conversion narrower than the source: calibrated on text
    max_length: int  # the evaluation window
    eval_ids: torch.Tensor


def _plan(loaded: Source, options: ConvertOptions, dtype: torch.dtype | None) -> _Plan:
    """The converted config (its width chosen by ``match_params`` when asked) and the evaluation ids: the
    checks that need the source (an evaluation text too short, ids beyond the vocabulary) fail here, before
    the slow steps."""
    src, variant, init = loaded.model, options.variant, options.init
    surgery = surgery_for(src.config.model_type)
    hidden, source_width = source_mlp_shape(surgery, src)
    num_layers = len(surgery.source_layers(src))
    source_parameters = {"mlp": source_mlp_parameters(surgery, src), "total": _count(src)}
    intermediate_size = options.intermediate_size
    if options.match_params:  # the biases the GLU will have count too: they follow from the config, whatever its width
        biases = glu_biases(surgery.config(src, variant, init, None))
        intermediate_size = matched_width(source_parameters["mlp"] // num_layers, hidden, source_width, biases)
    config = surgery.config(src, variant, init, intermediate_size)
    return _Plan(
        surgery=surgery,
        config=config,
        name=loaded.name or type(src).__name__,
        model_type=src.config.model_type,
        source_class=type(src).__name__,
        hidden=hidden,
        source_width=source_width,
        source_parameters=source_parameters,
        num_layers=num_layers,
        activation=surgery.activation(src),
        dtype=dtype or next(src.parameters()).dtype,
        reduced=init == "preserve" and config.glu_width < source_width,
        max_length=evaluation_window(surgery, src.config),
        eval_ids=evaluation_ids(options.eval_text, loaded.tokenizer, config.vocab_size, options.eval_tokens),
    )


@dataclass
class _Calibration:
    """What the source's own activations decide: each layer's unit map (``None``: the random scheme has
    none) and, for a width-reduced conversion, the fitted MLPs and the text they were fitted on."""

    unit_maps: list[UnitMap] | None = None
    fits: list[LayerFit] | None = None
    batch: torch.Tensor | None = None


def _calibrate(loaded: Source, plan: _Plan, options: ConvertOptions) -> _Calibration:
    """Run the source on calibration text where the preserve scheme needs it: a calibrated variant's unit
    maps, and a narrower MLP's kept units and re-fitted ``down_proj``. A step of its own because it must run
    the whole source before the transplant consumes it."""
    if options.init != "preserve":
        return _Calibration()
    src, surgery, config, variant = loaded.model, plan.surgery, plan.config, options.variant
    vocab = config.vocab_size
    if variant in CALIBRATED_VARIANTS:
        map_fit_text, _, _ = _default_texts()
        calibration_ids = _token_ids(map_fit_text, loaded.tokenizer, vocab, UNIT_MAP_FIT_TOKENS)
        recorded = _record_preactivations(src, surgery, calibration_ids, plan.max_length)
        unit_maps = [fit_unit_map(variant, plan.activation, config.glu_params, z) for z in recorded]
    else:  # a fixed map, the same for every layer
        unit_maps = [fit_unit_map(variant, plan.activation, config.glu_params)] * plan.num_layers
    if not plan.reduced:
        return _Calibration(unit_maps)
    text = options.calibration_text if options.calibration_text is not None else _default_calibration_text()
    batch = calibration_batch(
        _calibration_ids(text, loaded.tokenizer, vocab, options.calibration_tokens), plan.max_length
    )
    down_bias = glu_biases(config)[2]
    fits = fit_reduced_mlps(src, surgery, unit_maps, variant, config.glu_params, config.glu_width, batch,
                            plan.dtype, down_bias)  # fmt: skip
    return _Calibration(unit_maps, fits, batch)


def _transplant(
    loaded: Source, plan: _Plan, calibration: _Calibration, options: ConvertOptions, owned: bool
) -> tuple[PreTrainedModel, SourceRecord, list[LayerStats]]:
    """Record the source's outputs, then move its weights into the GLU model, each preserved MLP measured
    against the source's while both exist. One step because the source is consumed in it: an ``owned``
    source (read from disk, ours alone) is converted block by block and never whole in memory beside the
    converted model."""
    src, surgery, config, dtype = loaded.model, plan.surgery, plan.config, plan.dtype
    unit_maps, variant = calibration.unit_maps, options.variant
    # The source's pass comes first: afterwards the conversion may consume it.
    record = record_source(src, surgery, plan.eval_ids, plan.max_length, plan.max_length // 2)
    target = surgery.target_class(src)
    # A width-reduced MLP keeps a subset of the units and re-fits down: no unit-for-unit reference remains.
    stats = [LayerStats(unit_maps is not None and not plan.reduced) for _ in range(plan.num_layers)]

    def layer_done(i: int, source_layer: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        # The preserved MLP is measured against the source's while both exist; its records are then freed.
        reference = partial(surgery.preactivation, source_layer)
        stats[i].measure(record.mlp_io[i], {k: v.to(dtype) for k, v in weights.items()}, variant,
                         config.glu_params, reference)  # fmt: skip
        record.mlp_io[i] = []

    mlps = [fit.weights for fit in calibration.fits] if calibration.fits is not None else None
    state_dict = surgery.weights(src, config, unit_maps, owned, layer_done if unit_maps is not None else None, mlps)
    if owned:
        loaded.model = src = None  # consumed by the conversion
    # Built as reloading the saved checkpoint builds it: parameters in `dtype`, buffers in their own dtype.
    model = build_model(target, config, state_dict, dtype, seed=None if unit_maps is not None else options.seed)
    del state_dict
    model.config.dtype = dtype
    return model, record, stats


def _measure(
    model: PreTrainedModel,
    plan: _Plan,
    calibration: _Calibration,
    options: ConvertOptions,
    record: SourceRecord,
    stats: list[LayerStats],
) -> dict:
    """The converted model against the recorded source: per-layer MLP errors, outputs, perplexities
    (:func:`.report.compare`). The random scheme's MLPs exist only now, so they are measured here."""
    if calibration.unit_maps is None:  # random MLP weights exist only now; there is no unit-for-unit reference
        for i, mlp in enumerate(plan.surgery.glu_mlps(model)):
            stats[i].measure(record.mlp_io[i], mlp_weights(mlp), options.variant, plan.config.glu_params)
            record.mlp_io[i] = []
    return compare(record, model, stats, calibration.unit_maps)


def _report(
    model: PreTrainedModel,
    loaded: Source,
    plan: _Plan,
    calibration: _Calibration,
    options: ConvertOptions,
    measured: dict,
) -> dict:
    """The fidelity report written beside the checkpoint and rendered into its card: what was converted and
    how, the measurements, the parameter counts and, for a width-reduced conversion, how the width was chosen."""
    config, surgery = plan.config, plan.surgery
    report = {
        "source": plan.name,
        "source_class": plan.source_class,
        "source_model_type": plan.model_type,
        "converted_class": type(model).__name__,
        "source_activation": plan.activation,
        "source_projections": list(surgery.projections),  # the dense MLP's input and output projections
        "variant": options.variant,
        "init": options.init,
        "intermediate_size": config.glu_width,
        # A bias-free source MLP whose exact map needs a constant up path gets an up bias (said in the card).
        "up_bias_added": bool(getattr(config, "glu_up_bias", False)) and not getattr(config, "glu_bias", True),
        "dtype": str(model.dtype).removeprefix("torch."),
        "eval_data": describe_eval(options.eval_text, loaded.tokenizer),
        **measured,
    }
    glu_mlp = sum(p.numel() for mlp in surgery.glu_mlps(model) for p in mlp.parameters())
    report["parameters"] = {
        "source": plan.source_parameters,
        "converted": {"mlp": glu_mlp, "total": _count(model)},
        "counting": "each parameter tensor once (a tied head counts once); MLP: the dense MLP's two projections "
        "(weights and biases) against gate_proj, up_proj and down_proj with the biases the GLU MLP has",
    }
    if calibration.fits is not None:
        for layer, fit in zip(report["layers"], calibration.fits, strict=True):
            layer["calibration_mlp_relative_error"] = fit.calibration_relative_error
        report["width"] = _width_report(loaded, plan, calibration, options)
    return report


def _width_report(loaded: Source, plan: _Plan, calibration: _Calibration, options: ConvertOptions) -> dict:
    """How a width-reduced conversion chose its width and fitted its MLPs, and the command that recovers
    what the narrower MLP lost."""
    config, batch = plan.config, calibration.batch
    width = {
        "source_intermediate_size": plan.source_width,
        "intermediate_size": config.glu_width,
        "chosen_by": "match_params" if options.match_params else "intermediate_size",
        "importance": IMPORTANCE,
        "down_fit": f"ridge least squares (lambda = {DEFAULT_RIDGE_ALPHA} x the Gram matrix's mean diagonal, "
        "intercept unpenalised) of the source MLP's output on the kept units' outputs, layer by layer, each "
        "layer fed the already-converted layers' outputs",
        "calibration": {
            "data": _describe_calibration(options.calibration_text, loaded.tokenizer),
            "tokens": int(batch.numel()),
            "windows": int(batch.shape[0]),
        },
        "errors": "calibration_mlp_relative_error: on the calibration text, inputs from the converted layers "
        "before; mlp_relative_error: on the evaluation text, inputs from the source's layers",
        "recovery": recovery_command(plan.name, "DST"),
    }
    if options.match_params:
        hidden, biases = plan.hidden, glu_biases(config)
        width["match_params"] = {
            "source_mlp_per_layer": plan.source_parameters["mlp"] // plan.num_layers,
            "glu_mlp_per_layer": glu_mlp_parameters(hidden, config.glu_width, biases),
            "rule": f"the width N whose GLU MLP, 3·{hidden}·N weights{_bias_terms(hidden, biases)}, comes nearest "
            "the source MLP's count, rounded to a multiple of 8",
        }
    return width


def _bias_terms(hidden: int, biases: tuple[bool, bool, bool]) -> str:
    """The GLU MLP's bias terms in the parameter count, e.g. `` + N (gate bias) + N (up bias) + 768 (down bias)``."""
    sizes = ("N", "N", str(hidden))
    return "".join(f" + {size} ({name} bias)" for name, size, has in zip(("gate", "up", "down"), sizes, biases,
                                                                           strict=True) if has)  # fmt: skip


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_width_options(options: ConvertOptions, name: Callable[..., str]) -> None:
    """The width options' values and combinations, checked before the source is loaded."""
    match_params, intermediate_size, calibration_tokens = (
        options.match_params, options.intermediate_size, options.calibration_tokens
    )  # fmt: skip
    if not isinstance(match_params, bool):
        raise ConversionError(f"{name('match_params', match_params)} is invalid; expected True or False")
    if match_params and intermediate_size is not None:
        raise ConversionError(
            f"{name('match_params', True)} picks {name('intermediate_size')} itself; pass one of them, not both"
        )
    if isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 2:
        raise ConversionError(f"{name('calibration_tokens', calibration_tokens)} is invalid; expected an integer >= 2")
    if options.calibration_text is not None and not calibrates(options.init, intermediate_size, match_params):
        raise ConversionError(width_only(name, "calibration_text"))


def calibrates(init: str, intermediate_size: int | None, match_params: bool) -> bool:
    """Whether a conversion is asked for a width of its own under ``preserve`` (``intermediate_size`` or
    ``match_params``): the only kind that reads calibration text. The CLI's flag checks ask it too."""
    return init == "preserve" and (match_params or intermediate_size is not None)


def width_only(name: Callable[..., str], option: str) -> str:
    """The refusal of a calibration ``option`` given to a conversion that does not calibrate."""
    return (
        f"{name(option)} is used by a width-reduced conversion only; expected it with {name('match_params', True)} "
        f"or {name('intermediate_size')} set, and {name('init', 'preserve')}"
    )


def _default_texts() -> tuple[str, str, str]:
    """The head of the built-in corpus (``_DEFAULT_TEXT_CHARS``) halved at a paragraph, and the head itself:
    ``(calibration, evaluation, head)``."""
    head = builtin_corpus(_DEFAULT_TEXT_CHARS)
    calibration, evaluation = split_train_eval(head, 0.5)
    return calibration, evaluation, head


def _default_calibration_text() -> str:
    """The built-in corpus without the default evaluation text, so the default report scores held-out text."""
    calibration, _, head = _default_texts()
    return calibration + "\n\n" + builtin_corpus()[len(head) :].lstrip("\n")


def _calibration_ids(text: str, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, n: int) -> torch.Tensor:
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


@_takes_options
def convert_checkpoint(source: str | Path | PreTrainedModel, *args, **options) -> PreTrainedModel:
    """Turn a source model's MLPs into GLU MLPs; returns the converted model.

    A GPT-2 source becomes the matching ``GluFor*`` model; any other supported family (``hf_glu.FAMILIES``:
    gpt_neox, opt, bloom, falcon, …) becomes ``Glu<its class>``, the family's own architecture with each
    layer's MLP a GLU MLP and every other tensor unchanged.

    Args (the options after ``source`` are :class:`ConvertOptions`, shared by every entry point):
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
    conversion = _convert(source, ConvertOptions(*args, **options))
    conversion.model.conversion_report = conversion.report
    return conversion.model


# Another name of :func:`convert_checkpoint`, for callers that convert GPT-2: it converts any family too.
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
    write_report_and_card(conversion.report, folder, model_name or folder.name)


def write_report_and_card(report: dict, folder: Path, model_name: str) -> None:
    """``report`` as ``conversion_report.json`` and the model card rendered from it as ``README.md`` in ``folder``:
    the last two files of every route's checkpoint (in memory, streamed, layer by layer)."""
    # A NaN or inf here is a bug (the report replaces them with null and says why), so it fails, not hides.
    write_json(folder / "conversion_report.json", report, null_non_finite=False)
    render_conversion_card(report, model_name=model_name).save(folder / "README.md")


@_takes_options
def convert_to_folder(
    source: str | Path | PreTrainedModel,
    dst: str | Path,
    *args,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    **options,
) -> Conversion:
    """Convert ``source`` and write the checkpoint to ``dst`` atomically: ``dst`` is replaced only once
    everything is written (a non-empty ``dst`` only with ``force``); any failure leaves it untouched. The
    conversion's options are :func:`convert_checkpoint`'s."""
    chosen = ConvertOptions(*args, **options)  # a misspelt keyword fails first, as a Python call does
    local = source if isinstance(source, (str, Path)) else None  # a folder or a Hub id; an instance has no files
    dst = check_destination(dst, force, local)  # before the work, so a refusal costs nothing
    conversion = _convert(source, chosen)
    conversion.source.model = None  # measured already (a disk source is consumed already): free its memory
    if "width" in conversion.report:  # the recipe can now name the real destination
        conversion.report["width"]["recovery"] = recovery_command(conversion.report["source"], str(dst))
    with atomic_folder(dst, force, local) as tmp, writing_to(dst):
        write_checkpoint(conversion, tmp, max_shard_size, model_name=dst.name)
    return conversion
