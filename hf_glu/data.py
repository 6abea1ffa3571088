"""Text sources and tokenizer helpers: a built-in English corpus that needs no download, text files,
in-memory packing of token blocks, and a byte-level BPE tokenizer trained on the spot (the `datasets`
pipeline for training data is ``training_data``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path

# Standard-library modules whose docstrings make the built-in corpus: plain English prose about
# programming, present on every Python install, so demos and tests run offline.
_CORPUS_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "trace", "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)  # fmt: skip


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from a slim Python build simply contributes nothing
        return []
    docs = [inspect.getdoc(module) or ""]
    for _, member in sorted(vars(module).items()):
        if (inspect.isclass(member) or inspect.isfunction(member)) and member.__module__ == module.__name__:
            docs.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                for _, method in sorted(vars(member).items()):
                    if inspect.isfunction(method):
                        docs.append(inspect.getdoc(method) or "")
    return [d.strip() for d in docs if len(d.strip()) > 40]


def builtin_corpus(max_chars: int | None = None) -> str:
    """The docstrings of a fixed list of standard-library modules, deterministic for a Python version.

    About 0.7 MB of English on CPython 3.11; ``max_chars`` truncates it at a paragraph boundary.
    """
    seen: set[str] = set()
    paragraphs: list[str] = []
    total = 0
    for name in _CORPUS_MODULES:
        for doc in _docstrings(name):
            if doc in seen:
                continue
            seen.add(doc)
            if max_chars is not None and total + len(doc) > max_chars:
                return "\n\n".join(paragraphs)
            paragraphs.append(doc)
            total += len(doc) + 2
    return "\n\n".join(paragraphs)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; a clear error if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty; expected some text")
    return text


def split_train_eval(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Split ``text`` at a paragraph boundary: the first part for training, the last for evaluation."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction!r} is invalid; expected a number in (0, 1)")
    cut = int(len(text) * (1 - eval_fraction))
    boundary = text.rfind("\n\n", 0, cut)
    cut = boundary if boundary > 0 else cut
    return text[:cut], text[cut:].lstrip("\n")


def train_bpe_tokenizer(text: str, vocab_size: int = 4096):
    """Train a GPT-2 style byte-level BPE tokenizer on ``text``; returns a ``PreTrainedTokenizerFast``.

    The end-of-text token ``<|endoftext|>`` is id 0 and doubles as BOS, EOS and padding, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eot],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    # Built from the object: passing vocab/merges files silently yields an empty tokenizer in v5.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eot, eos_token=eot, pad_token=eot, unk_token=eot
    )


def iter_token_blocks(documents: Iterable[list[int]], block_size: int) -> Iterator[list[int]]:
    """Consecutive full blocks of ``block_size`` tokens from the documents' token ids joined in order;
    the last, partial block is dropped. Holds at most one block plus one document in memory."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} is invalid; expected an integer >= 2")
    pending: list[int] = []
    for ids in documents:
        pending.extend(ids)
        if len(pending) >= block_size:
            full = len(pending) - len(pending) % block_size
            for start in range(0, full, block_size):
                yield pending[start : start + block_size]
            pending = pending[full:]


def pack_token_blocks(texts: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """Tokenise documents, join them with the EOS token and cut the stream into full blocks of
    ``block_size`` tokens (the remainder is dropped), the usual packing for causal-LM training."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate packed documents")
    eos = tokenizer.eos_token_id
    documents = [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    blocks = list(iter_token_blocks(documents, block_size))
    if not blocks:
        tokens = sum(len(ids) for ids in documents)
        raise ValueError(f"the text makes {tokens} tokens, fewer than one block of {block_size}")
    return blocks
