"""``hf-glu``: the command line. Thin by design: parse, call the API, print; the one other thing it does is
tune glibc's allocator for its own process (:func:`_release_freed_memory` says why and what it saves).

Each subcommand is a pair ``(add_<name>(subparsers), run_<name>(args) -> int)`` listed in
``SUBCOMMANDS``; adding one means writing the pair and appending it. Bad input (a
:class:`~hf_glu.convert.ConversionError`, a missing file, an invalid value) ends with one line on
stderr and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Transformers probes the kernels hub for flash-attention fallbacks whenever a modeling module is
# imported; offline, `kernels` logs "Skipping publisher trust check …" once per kernel. The CLI loads no hub
# kernel, so these lines are not ours to print and would break the one-line error contract. Set before
# the imports below, which import modeling modules.
logging.getLogger("kernels").setLevel(logging.ERROR)

from .bad_input import BAD_INPUT, OneLineParser, refuse  # noqa: E402
from .convert.surgery import SUPPORTED_MODEL_TYPES  # noqa: E402
from .convert.width import DEFAULT_CALIBRATION_TOKENS  # noqa: E402
from .glu import VARIANTS  # noqa: E402
from .jsonio import strict_json  # noqa: E402


def add_convert(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="turn a checkpoint's MLPs (GPT-2 or another supported family) into GLU MLPs and write a Hub-ready "
        "checkpoint",
        description="Convert a checkpoint of a supported model type (folder or Hub id) into a GLU checkpoint folder, "
        "with a fidelity report (conversion_report.json) and a model card (README.md). GPT-2 becomes GluFor*; every "
        f"other family keeps its own architecture with GLU MLPs. Model types: {', '.join(SUPPORTED_MODEL_TYPES)}.",
    )
    p.add_argument("src", help="checkpoint folder or Hub model id of a supported model type")
    p.add_argument("dst", help="output folder (written atomically; must be empty unless --force)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS), help="GLU variant")
    p.add_argument("--init", default="preserve", choices=("preserve", "random"), help="init scheme (default: preserve)")
    p.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="GLU width; with --init preserve at most the source's: each layer keeps its most important units "
        "and re-fits down_proj on calibration text (equal to the source's: every unit, as without the option)",
    )
    p.add_argument(
        "--match-params",
        action="store_true",
        help="pick the GLU width at which the MLP has the source MLP's parameter count (rounded to a multiple of 8)",
    )
    p.add_argument(
        "--calibration-text",
        default=None,
        help="UTF-8 text file the width reduction fits on (default: the built-in corpus, without the eval part)",
    )
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        help=f"tokens of it to use (default: {DEFAULT_CALIBRATION_TOKENS})",
    )
    p.add_argument("--eval-text", default=None, help="UTF-8 text file for the fidelity report (default: built-in)")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens of it to evaluate (default: 256)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="weights' dtype")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB (default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="stream a checkpoint larger than memory shard by shard (families other than GPT-2, fixed-map "
        "variants, safetensors): no model is built and no fidelity pass runs; the card says so",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="stream the conversion as --no-eval does, then run the full fidelity report layer by layer, with one "
        "module's weights in memory at a time (largest module at most SIZE, e.g. 4GB)",
    )
    return p


def run_convert(args: argparse.Namespace) -> int:
    from .convert import DEFAULT_EVAL_TOKENS
    from .convert.pipeline import convert_to_folder
    from .convert.save import check_destination

    _check_convert_options(args)  # refuse before the slow part
    check_destination(args.dst, args.force, args.src)
    _release_freed_memory()
    if args.no_eval or args.max_memory is not None:
        return _run_streamed_convert(args)
    eval_text = _text_prefix(args, args.eval_text, args.eval_tokens, "eval") if args.eval_text is not None else None
    calibration_text = (
        _text_prefix(args, args.calibration_text, args.calibration_tokens, "calibration")
        if args.calibration_text is not None else None
    )  # fmt: skip
    conversion = convert_to_folder(
        args.src,
        args.dst,
        variant=args.variant,
        init=args.init,
        intermediate_size=args.intermediate_size,
        torch_dtype=args.dtype,
        force=args.force,
        max_shard_size=args.max_shard_size,
        eval_text=eval_text,
        eval_tokens=DEFAULT_EVAL_TOKENS if args.eval_tokens is None else args.eval_tokens,
        match_params=args.match_params,
        calibration_text=calibration_text,
        calibration_tokens=args.calibration_tokens or DEFAULT_CALIBRATION_TOKENS,
    )
    report = conversion.report
    print(f"wrote {args.dst} ({report['converted_class']}, {report['variant']}, init={report['init']})")
    if "width" in report:
        width, counts = report["width"], report["parameters"]
        print(f"width: {width['intermediate_size']} of the source's {width['source_intermediate_size']} units; "
              f"MLP parameters {counts['source']['mlp']:,} → {counts['converted']['mlp']:,}, "
              f"total {counts['source']['total']:,} → {counts['converted']['total']:,}")  # fmt: skip
    _print_fidelity(report)
    return 0


def _print_fidelity(report: dict, how: str = "") -> None:
    """The report's fidelity figures in two lines, or why there are none."""
    if "evaluation" in report:
        print(f"fidelity: {report['evaluation']}")
        return
    print(f"max |Δ {report['compared_output']}| = {report['max_abs_output_diff']:.3g}{how}")
    if "perplexity" in report:
        ppl = report["perplexity"]
        print(f"perplexity: source {ppl['source']:.4f}, converted {ppl['converted']:.4f} (ratio {ppl['ratio']:.5f})")


def _flag(option: str, *value: object) -> str:
    """How this command line names a conversion option in the library's messages: ``--eval-tokens 0``."""
    flag = "--" + option.replace("_", "-")
    return flag if not value or value[0] is True else f"{flag} {value[0]}"


def _check_convert_options(args: argparse.Namespace) -> None:
    """The options' values, checked before anything is loaded or read; each error names the option and what it
    takes. The conversion's own checks answer for its options; here are only those of the command line itself
    (its files, its routes)."""
    from .convert.pipeline import ConvertOptions, calibrates, check_options, width_only
    from .convert.stream import parse_size

    if not args.src.strip():
        raise ValueError("SRC is empty; expected a checkpoint folder or a Hub model id")
    check_options(
        ConvertOptions(
            args.variant, args.init, args.intermediate_size, args.dtype, match_params=args.match_params,
            calibration_text=args.calibration_text,  # the file's name stands for its text: only given or not counts
            **{k: v for k in ("eval_tokens", "calibration_tokens") if (v := getattr(args, k)) is not None},
        ),
        name=_flag,
    )  # fmt: skip
    # The library cannot tell a --calibration-tokens given from its default: a flag left without effect is ours.
    calibrating = calibrates(args.init, args.intermediate_size, args.match_params)
    if args.calibration_tokens is not None and not calibrating and not args.no_eval:
        raise ValueError(width_only(_flag, "calibration_tokens"))
    parse_size(args.max_shard_size, f"--max-shard-size {args.max_shard_size!r}", "500MB or 5GB")
    if args.max_memory is not None:
        _check_max_memory(args)
    for option in ("eval_text", "calibration_text"):
        if getattr(args, option) is not None and not Path(getattr(args, option)).is_file():
            raise ValueError(f"{_flag(option, repr(getattr(args, option)))} is not a file; expected a UTF-8 text file")


def _check_max_memory(args: argparse.Namespace) -> None:
    from .convert.stream import parse_size

    if args.no_eval:
        raise ValueError("--max-memory runs the fidelity pass that --no-eval skips; pass one of them, not both")
    parse_size(args.max_memory, f"--max-memory {args.max_memory!r}", "500MB or 4GB")


def _text_prefix(args: argparse.Namespace, path: str, tokens: int | None, use: str) -> str:
    """The start of the ``--eval-text`` or ``--calibration-text`` file that makes the tokens the conversion uses,
    read with the source's own tokenizer (as the conversion reads it): a large file is never read, nor tokenized,
    whole."""
    from .convert import DEFAULT_EVAL_TOKENS
    from .convert.source import read_tokenizer, source_folder
    from .convert.width import DEFAULT_CALIBRATION_TOKENS
    from .data import iter_text, read_token_prefix

    tokenizer = read_tokenizer(source_folder(args.src))
    if tokenizer is None:  # the conversion refuses text it cannot tokenize: a first piece is enough for that
        return next(iter_text(path), "")
    default = DEFAULT_EVAL_TOKENS if use == "eval" else DEFAULT_CALIBRATION_TOKENS
    return read_token_prefix(path, tokenizer, default if tokens is None else tokens)[0]


def _run_streamed_convert(args: argparse.Namespace) -> int:
    from .convert.stream import stream_convert

    measured = args.max_memory is not None  # the evaluation options are --max-memory's too
    options = ("init", "intermediate_size", "match_params", "calibration_text", "calibration_tokens", "dtype",
               *(() if measured else ("eval_text", "eval_tokens")))  # fmt: skip
    refused = [f"--{name.replace('_', '-')}" for name in options
               if getattr(args, name) not in (None, "preserve", False)]  # fmt: skip
    if refused:
        route = "--max-memory" if measured else "--no-eval"
        raise ValueError(f"{', '.join(refused)} cannot be used with {route}, which streams the source as it is "
                         "(a width change runs calibration text through the model)")  # fmt: skip
    if not measured:
        report = stream_convert(args.src, args.dst, args.variant, force=args.force, max_shard_size=args.max_shard_size)
        print(f"wrote {args.dst} ({report['converted_class']}, {report['variant']}, init=preserve, streamed)")
        print(f"fidelity: {report['evaluation']}")
        return 0
    from .convert import DEFAULT_EVAL_TOKENS
    from .convert.layerwise import stream_convert_measured

    eval_text = _text_prefix(args, args.eval_text, args.eval_tokens, "eval") if args.eval_text is not None else None
    report = stream_convert_measured(
        args.src, args.dst, args.variant, args.max_memory, eval_text=eval_text,
        eval_tokens=DEFAULT_EVAL_TOKENS if args.eval_tokens is None else args.eval_tokens, force=args.force,
        max_shard_size=args.max_shard_size,
    )  # fmt: skip
    print(f"wrote {args.dst} ({report['converted_class']}, {report['variant']}, init=preserve, streamed)")
    _print_fidelity(report, " (measured layer by layer)")
    return 0


def _release_freed_memory() -> None:
    """Make glibc hand large freed blocks straight back to the system, in this process.

    Its adaptive mmap threshold otherwise climbs to 32 MB after the first large free, and freed weights and
    activations up to that size stay in the heap, raising the peak of ``--max-memory``, which reads and frees
    one module at a time (figures: benchmarks/README.md, "malloc"). It is here, not in the library, because it
    sets the allocator of the whole process: the CLI owns its process, while a library call must not retune its
    caller's.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: a fixed 1 MB
    except (OSError, AttributeError):  # not glibc
        pass


def add_eval(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="perplexity of a causal LM on a text file (sliding window)",
        description="Sliding-window perplexity, as in Transformers' 'Perplexity of fixed-length models' guide.",
    )
    p.add_argument("model", help="checkpoint folder or Hub model id (any causal LM)")
    p.add_argument("--text-file", required=True, help="UTF-8 text file to score")
    p.add_argument("--max-length", type=int, default=None, help="window length (default: the model's, at most 1024)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="score only the first N tokens (only the text they need is read)"
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    return p


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .convert.perplexity import perplexity
    from .convert.source import source_folder
    from .data import read_text, read_token_prefix
    from .positions import max_positions

    for option, value, least in (("--max-length", args.max_length, 2), ("--stride", args.stride, 1),
                                 ("--max-tokens", args.max_tokens, 2)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{option} {value} is invalid; expected an integer >= {least}")
    if not Path(args.text_file).is_file():  # before the model's load, the slow part
        raise FileNotFoundError(f"--text-file {args.text_file!r} is not a file; expected a UTF-8 text file")
    folder = source_folder(args.model)  # the files convert would read, checked as it checks them
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    except Exception as e:  # missing files, bad configs: many types, all mean "cannot load"
        raise ValueError(f"{args.model!r} cannot be loaded ({type(e).__name__}: {e})") from None
    # The window from the config, before the weights are read.
    positions = max_positions(config)
    if args.max_length is not None and positions and args.max_length > positions:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's {positions} positions")
    max_length = args.max_length or min(positions or 1024, 1024)
    stride = args.stride or max(max_length // 2, 1)
    if stride > max_length:
        raise ValueError(f"--stride {stride} exceeds the window of {max_length} tokens; expected at most that")
    # Only the tokens scored are read and tokenized (bounded memory whatever the file's size); the text is
    # checked (UTF-8, not empty) before the model is loaded.
    if args.max_tokens is None:
        token_ids = tokenizer(read_text(args.text_file), add_special_tokens=False).input_ids
    else:
        token_ids = read_token_prefix(args.text_file, tokenizer, args.max_tokens)[1]
    ids = torch.tensor([token_ids], dtype=torch.long)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    except Exception as e:  # missing files, corrupt weights, bad configs: many types, all mean "cannot load"
        raise ValueError(f"{args.model!r} cannot be loaded ({type(e).__name__}: {e})") from None
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(
            f"the tokenizer of {args.model!r} produces ids up to {int(ids.max())}, beyond the model's vocabulary "
            f"of {vocab}; expected the tokenizer the model was trained with"
        )
    result = perplexity(model, ids, max_length=max_length, stride=stride)
    print(strict_json({"model": args.model, "text_file": args.text_file, **result}))  # inf -> null
    return 0


def add_push(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push",
        help="upload a checkpoint folder to the Hugging Face Hub",
        description="Upload a checkpoint folder (weights, config, code files, tokenizer, model card) to a Hub "
        "repo, creating it if needed. Folders that would not load (no config, no weights, missing code "
        "files) are refused before anything is sent.",
    )
    p.add_argument("folder", help="checkpoint folder, e.g. the output of `hf-glu convert`")
    p.add_argument("repo_id", help="Hub repo, e.g. your-name/gpt2-swiglu")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", default=None, help="commit message (default: 'Upload FOLDER with hf-glu')")
    return p


def run_push(args: argparse.Namespace) -> int:
    from .hub import push_checkpoint

    url = push_checkpoint(args.folder, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"pushed {args.folder} to {url}")
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo: pretrain a small GPT-2, convert it to GLU, fine-tune, compare",
        description="The whole story on the built-in corpus, offline: train a tokenizer, pretrain a small GPT-2, "
        "convert it to GLU (geglu_tanh exactly, swiglu approximately), fine-tune each next to the GPT-2 trained "
        "on for the same budget, reload in a fresh process, generate, tabulate, plot.",
    )
    p.add_argument("--output-dir", default="hf-glu-demo", help="where everything goes (default: ./hf-glu-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller, about one-minute run")
    p.add_argument("--text-file", default=None, help="UTF-8 text to use instead of the built-in corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # lazily: the demo pulls in Trainer and matplotlib

    run_demo(
        output_dir=args.output_dir, quick=args.quick, text_file=args.text_file, seed=args.seed, threads=args.threads
    )
    return 0


# Importing the package (hf_glu/__init__) registers the GLU classes with the Auto classes, which
# `eval` relies on to load GLU checkpoints without trust_remote_code.
SUBCOMMANDS: tuple[tuple[Callable, Callable], ...] = (
    (add_convert, run_convert),
    (add_eval, run_eval),
    (add_push, run_push),
    (add_demo, run_demo),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hf-glu", description="GLU feed-forward layers for Hugging Face Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, run in SUBCOMMANDS:
        add(subparsers).set_defaults(run=run)
    return parser


class Signalled(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so that clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_as_exceptions() -> Iterator[list[int]]:
    """SIGTERM and SIGHUP raise :class:`Signalled` (Python's default would end the process without any
    ``finally``, leaving half-written folders behind); yields the signals received so far; the previous
    handlers come back afterwards."""
    received: list[int] = []

    def raise_signalled(signum: int, frame) -> None:
        received.append(signum)
        raise Signalled(signum)

    caught = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    try:
        previous = {s: signal.signal(s, raise_signalled) for s in caught}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand that refused them, with where its options are listed
        listed = f"see hf-glu {args.command} --help"
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(unknown)}; {listed}")
    received: list[int] = []
    try:
        with _signals_as_exceptions() as received:
            return args.run(args)
    except Signalled as e:
        return _stopped(args, e.signum)
    except BAD_INPUT as e:
        if received:  # raised by clean-up the signal cut into (e.g. a descriptor closed twice): not bad input
            return _stopped(args, received[0])
        return refuse(f"hf-glu {args.command}", e)
    except KeyboardInterrupt:
        print(f"hf-glu {args.command}: interrupted", file=sys.stderr)
        return 130


def _stopped(args: argparse.Namespace, signum: int) -> int:
    print(f"hf-glu {args.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
