"""Model cards: the README.md of a converted checkpoint, rendered from a template in ``model_cards/``.

The templates live in the repository's top-level ``model_cards/`` folder, next to ``hf_glu/``: they are
documents, edited as such. pyproject.toml maps that folder to the data-only package ``hf_glu.model_cards``,
so a wheel or plain ``pip install .`` ships them as ``hf_glu/model_cards/*.md`` and an editable install
resolves the same name to the folder itself; ``template_text`` reads them through ``importlib.resources``,
which finds them either way (tests/hub/test_cards.py checks both).

The YAML header is written by ``huggingface_hub.ModelCardData`` (with ``EvalResult`` entries for the
model-index), so it is what the Hub validates.

Names the user chose (the destination folder's, the source's path or id) are text in the card, never markup:
control characters are shown as escapes (``\\n``), Markdown's inline punctuation is backslash-escaped and
``<``, ``>``, ``&`` become entities, so a name cannot open a heading, a code span, a link or HTML. The load
snippet pastes a name only when it is a valid Hub repository id, quoted as a Python string; any other name is
shown in the title but replaced by a placeholder in the code.
"""

from __future__ import annotations

import json
import math
import unicodedata
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .glu import get_variant

TEMPLATE_PACKAGE = "hf_glu.model_cards"  # the top-level model_cards/ folder, mapped in pyproject.toml
CONVERSION_TEMPLATE = "glu_conversion.md"
PLACEHOLDER_PATH = "path/to/the/checkpoint"  # in the snippets when the name is not a repository id

_MARKDOWN_INLINE = set("\\`*_[]#|~$!")  # what opens emphasis, code, links, images, headings, tables, math
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}

# By the converted class's name ending: GPT-2's GluFor* and every family's Glu<Class>.
_PIPELINE_TAGS = (
    (("ForCausalLM", "LMHeadModel"), "text-generation", "AutoModelForCausalLM"),
    (("ForSequenceClassification",), "text-classification", "AutoModelForSequenceClassification"),
    (("ForTokenClassification",), "token-classification", "AutoModelForTokenClassification"),
    (("ForQuestionAnswering",), "question-answering", "AutoModelForQuestionAnswering"),
    (("Model",), "feature-extraction", "AutoModel"),
)


def _pipeline_tag(converted_class: str) -> tuple[str, str]:
    return next((tag, auto) for endings, tag, auto in _PIPELINE_TAGS if converted_class.endswith(endings))


def _what_changed(report: dict) -> str:
    """The card's list of what the conversion changed, GPT-2's rebuild or another family's MLP swap."""
    proj_in, proj_out = report["source_projections"]
    mlp = (
        f"- **MLP**: the source's `{proj_out}(act({proj_in}(x)))` with act = {_code(report['source_activation'])} "
        "became "
        f"`down_proj({get_variant(report['variant']).formula})` with `gate_proj`, `up_proj`, `down_proj` as "
        f"`nn.Linear` layers of width {report['intermediate_size']}."
    )
    if report.get("source_model_type", "gpt2") == "gpt2":
        return mlp + (
            "\n- **Attention**: the same weights, with GPT-2's fused `c_attn` split into `q_proj`, `k_proj`, "
            "`v_proj` and `c_proj` renamed `o_proj` (GPT-2's `Conv1D` weights are transposed to `nn.Linear`)."
            "\n- **Everything else** (embeddings, layer norms, head, every GPT-2 config option) is carried over as is."
        )
    text = mlp + (
        f"\n- **Everything else** is the `{report['source_model_type']}` architecture itself "
        f"(`{report['converted_class']}` subclasses Transformers' `{report['source_class']}`): attention, positions, "
        "norms and residual layout unchanged, every other tensor under its original name with its original value."
    )
    if report.get("up_bias_added"):
        text += (
            "\n- The source MLP has no biases; `up_proj` was given one, because the exact map's constant up path "
            "(`up = 1`) can only live in a bias. `gate_proj` and `down_proj` stay bias-free."
        )
    return text


def template_text(name: str = CONVERSION_TEMPLATE) -> str:
    """The text of the model-card template ``name`` (a file of ``model_cards/``), in any kind of install."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def _repo_id(name: str) -> str | None:
    """``name`` when it is a valid Hub repository id (``gpt2``, ``owner/name``): safe to paste into code."""
    try:
        validate_repo_id(name)
    except (HFValidationError, TypeError):
        return None
    return name


def visible(name: str) -> str:
    """``name`` on one line: control, format and line-separator characters shown as their escapes (``\\n``)."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
        for c in str(name)
    )


def markdown_text(name: str) -> str:
    """``name`` as Markdown that renders as exactly its :func:`visible` text, wherever inline text may go."""
    return "".join(_ENTITIES.get(c) or (f"\\{c}" if c in _MARKDOWN_INLINE else c) for c in visible(name))


def _code(text: str) -> str:
    """``text`` as one Markdown code span: fenced by a backtick run longer than any inside it."""
    text = visible(text)
    run = max((len(part) for part in text.replace("`", " ` ").split() if set(part) == {"`"}), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _scheme_text(report: dict) -> str:
    if report["init"] == "random":
        return (
            "`random`: the GLU projections are freshly initialised (the architecture's own scheme); attention, "
            "embeddings and norms come from the source. The model must be fine-tuned before use."
        )
    layer = report["layers"][0]["unit_map"]
    exact = all(entry["unit_map"]["exact"] for entry in report["layers"])
    proj_in, proj_out = report["source_projections"]
    # A width-reduced conversion re-fits down_proj (the card's Width section says how).
    down = "`down_proj` re-fitted (see Width below)" if "width" in report else f"`down_proj = {proj_out}`"
    text = (
        f"`preserve`: with `z = {proj_in}(x)` the source's pre-activation, {down} and "
        f"`gate = {layer['gate_scale']:.6g}·z + {layer['gate_shift']:.6g}`, "
        f"`up = {layer['up_scale']:.6g}·z + {layer['up_shift']:.6g}`"
    )
    if len({str(entry["unit_map"]) for entry in report["layers"]}) > 1:
        text += " (layer 0; each layer is fitted on its own recorded pre-activations, see the report)"
    text += ". " + _bound_text(report, exact)
    # The claim about the whole model follows the measurement, never the map alone: "exactly" only for a
    # measured difference of 0 (rounding in the converted dtype can make an exact map's outputs differ).
    measured = report.get("max_abs_output_diff")
    if "evaluation" in report or measured is None:
        return text + " The converted model was not run against the source (see Fidelity)."
    output = report.get("compared_output", "outputs")
    if measured == 0.0:
        return text + f" Measured on the evaluation text, the converted model's {output} equal the source's exactly."
    return text + (
        f" Measured on the evaluation text, the converted model's {output} differ from the source's by at most "
        f"{_rounded_up(measured)}."
    )


def _bound_text(report: dict, exact: bool) -> str:
    """The activation map's claim: exact, or each layer's bound on the range of z it was computed over."""
    if exact:
        return "The map is exact in real arithmetic: the GLU computes the source's activation itself."
    maps = [entry["unit_map"] for entry in report["layers"]]
    worst = max(range(len(maps)), key=lambda i: maps[i]["bound"])
    bound, (low, high) = maps[worst]["bound"], maps[worst]["fit_range"]
    tail = "Where the up weights start at zero they still receive gradients, so fine-tuning learns the gated path."
    if len({(m["bound"], tuple(m["fit_range"])) for m in maps}) == 1:
        activation = _code(report["source_activation"])
        return (f"The GLU approximates {activation} to within {bound:.3g} per intermediate unit "
                f"for z in [{low:.3g}, {high:.3g}]. {tail}")  # fmt: skip
    # Each layer's bound holds on its own range only: a bound is never paired with another layer's range.
    per_layer = "; ".join(
        f"layer {i}: {m['bound']:.3g} on z in [{m['fit_range'][0]:.3g}, {m['fit_range'][1]:.3g}]"
        for i, m in enumerate(maps)
    )
    return (
        f"The GLU approximates {_code(report['source_activation'])} per intermediate unit within each layer's bound on "
        f"that layer's own fitted range of z, the worst being layer {worst}'s {bound:.3g} on z in "
        f"[{low:.3g}, {high:.3g}]. Per layer: {per_layer}. {tail}"
    )


def _rounded_up(value: float) -> str:
    """``value`` printed to 3 significant digits, never below it: an "at most" figure stays true as printed."""
    text = f"{value:.3g}"
    if float(text) >= value or not math.isfinite(value):
        return text
    unit = 10.0 ** (math.floor(math.log10(abs(value))) - 2)
    return f"{math.ceil(value / unit) * unit:.3g}"


def _width_text(report: dict) -> str:
    """The card's Width section: what was kept and re-fitted, the parameter counts, each layer's error on the
    calibration and the evaluation text, and how to recover what was lost."""
    width, counts = report["width"], report["parameters"]
    kept, total = width["intermediate_size"], width["source_intermediate_size"]
    how = "chosen so the GLU MLP has the source MLP's parameter count" if width["chosen_by"] == "match_params" else (
        "chosen by the user")
    lines = [
        f"Each layer keeps {kept} of the source's {total} MLP units ({how}). Units are ranked by "
        f"{width['importance']}; `down_proj` is re-fitted by {width['down_fit']}. Calibration: "
        f"{width['calibration']['tokens']:,} tokens of {width['calibration']['data']}.",
        "",
        "| parameters | source | converted |",
        "|---|---:|---:|",
        f"| MLP (all layers) | {counts['source']['mlp']:,} | {counts['converted']['mlp']:,} |",
        f"| total | {counts['source']['total']:,} | {counts['converted']['total']:,} |",
        "",
        f"Counted as: {counts['counting']}.",
    ]
    if "match_params" in width:
        lines += ["", f"Width rule: {width['match_params']['rule']}."]
    lines += [
        "",
        "| layer | MLP relative error, calibration text | MLP relative error, evaluation text |",
        "|---|---:|---:|",
        *(f"| {layer['layer']} | {layer['calibration_mlp_relative_error']:.3g} | {layer['mlp_relative_error']:.3g} |"
          for layer in report["layers"]),  # fmt: skip
        "",
        f"({width['errors']}.) Fewer units cannot compute exactly what the source did: recover the rest by "
        f"distilling from the source, e.g. {_code(width['recovery'])} (add `--train-file` with your own text).",
    ]
    return "\n".join(lines)


def _eval_results(report: dict, dataset_name: str) -> list[EvalResult] | None:
    perplexity = report.get("perplexity")
    if not perplexity or perplexity.get("converted") is None or perplexity.get("source") is None:
        return None
    common = {"task_type": "text-generation", "dataset_type": "text", "dataset_name": dataset_name}
    return [
        EvalResult(**common, metric_type="perplexity", metric_value=round(perplexity["converted"], 4),
                   metric_name="perplexity (converted, before fine-tuning)"),
        EvalResult(**common, metric_type="perplexity", metric_value=round(perplexity["source"], 4),
                   metric_name="perplexity (source)"),
    ]  # fmt: skip


def render_conversion_card(report: dict, model_name: str, repo_or_path: str | None = None) -> ModelCard:
    """The model card of a converted checkpoint, from its fidelity ``report``. ``model_name`` (the title) and
    ``repo_or_path`` (pasted into the load snippet when a valid repository id; default ``model_name``) are
    shown as text, whatever they hold."""
    variant = get_variant(report["variant"])
    pipeline_tag, auto_class = _pipeline_tag(report["converted_class"])
    base_model = None if Path(report["source"]).exists() else _repo_id(report["source"])  # a Hub source
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=["hf-glu", "glu", variant.name, f"init-{report['init']}", report.get("source_model_type", "gpt2"),
              "custom_code"],  # fmt: skip
        pipeline_tag=pipeline_tag,
        model_name=visible(model_name),
        eval_results=_eval_results(report, report.get("eval_data", "")),
    )
    if base_model:
        source_text = f"[{markdown_text(base_model)}](https://huggingface.co/{base_model})"
    else:
        source_text = markdown_text(report["source"])
    finetune_note = (
        "Fine-tuning starts from the source's behaviour; the zero-initialised up weights move from the first step."
        if report["init"] == "preserve"
        else "Start with a learning rate suited to pre-training the MLPs: they begin from scratch."
    )
    repo = _repo_id(repo_or_path or model_name)
    return ModelCard.from_template(
        card_data,
        template_str=template_text(),
        **{k: v for k, v in report.items() if k not in ("variant", "source", "source_class")},
        title=markdown_text(model_name),
        source_text=f"{source_text} ({_code(report['source_class'])})",
        variant=variant.name,
        formula=variant.formula,
        scheme_text=_scheme_text(report),
        what_changed=_what_changed(report),
        has_units=report["init"] == "preserve" and "width" not in report,  # reduced: no unit-for-unit reference
        width_text=_width_text(report) if "width" in report else "",
        auto_class=auto_class,
        repo_literal=json.dumps(repo or PLACEHOLDER_PATH, ensure_ascii=False),
        repo_is_pasted=repo is not None,
        finetune_note=finetune_note,
    )
