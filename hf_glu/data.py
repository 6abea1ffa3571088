"""Text sources and tokenizer helpers: a built-in English corpus that needs no download, text files,
in-memory packing of token blocks, and a byte-level BPE tokenizer trained on the spot (the `datasets`
pipeline for training data is ``training_data``).
"""

from __future__ import annotations

import codecs
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


# Byte-order marks of the encodings a text file is most often saved in instead of UTF-8 (UTF-32's first: UTF-16
# LE's is a prefix of UTF-32 LE's).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))  # fmt: skip
_UTF8_BOM = b"\xef\xbb\xbf"
_READ_BYTES = 1 << 16
# Tokens read past the N asked for before the first N are taken as final: a tokenizer decides a token from the
# text around it (a word, a run of spaces), so the N-th token could change if the text stopped right after it.
_TOKEN_MARGIN = 64


def iter_text(path: str | Path, chunk_bytes: int = _READ_BYTES) -> Iterator[str]:
    """The text of the UTF-8 file ``path``, read lazily ``chunk_bytes`` at a time (a UTF-8 byte-order mark is
    dropped). A file that is not UTF-8 text is refused, naming it, when the offending bytes are read: a
    UTF-16/UTF-32 byte-order mark, a NUL byte (UTF-16 without a mark, or binary data: valid UTF-8 in law, text
    in no tokenizer's sense), or bytes that do not decode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the block being decoded, in the file
    with path.open("rb") as file:
        while True:
            block = file.read(chunk_bytes)
            if offset == 0:
                _check_no_other_bom(path, block)
                if block.startswith(_UTF8_BOM):
                    block, offset = block[len(_UTF8_BOM) :], len(_UTF8_BOM)
            if (nul := block.find(b"\x00")) >= 0:
                raise ValueError(
                    f"text file {str(path)!r} holds NUL bytes (the first at byte offset {offset + nul}), as UTF-16 "
                    "text without a byte-order mark or binary data does; expected UTF-8 text"
                )
            held = len(decoder.getstate()[0])  # the start of a character cut by the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"text file {str(path)!r} is not UTF-8 (invalid byte at offset {offset - held + error.start}); "
                    "expected UTF-8 text"
                ) from None
            if not block:
                return
            offset += len(block)
            if text:
                yield text


def _check_no_other_bom(path: Path, head: bytes) -> None:
    for bom, encoding in _OTHER_BOMS:
        if head.startswith(bom):
            raise ValueError(
                f"text file {str(path)!r} is {encoding} (it starts with the {encoding} byte-order mark); expected "
                f"UTF-8 text (convert it, e.g. iconv -f {encoding} -t UTF-8)"
            )


def _check_has_text(path: str | Path, text: str) -> None:
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty; expected some text")


def read_text(path: str | Path) -> str:
    """The whole text of a UTF-8 file; a clear error naming it if it is missing, empty or not UTF-8 text."""
    text = "".join(iter_text(path))
    _check_has_text(path, text)
    return text


def read_token_prefix(
    path: str | Path, tokenizer, max_tokens: int, *, chunk_bytes: int = _READ_BYTES
) -> tuple[str, list[int]]:
    """The first ``max_tokens`` token ids of a UTF-8 text file and a prefix of its text that makes them,
    reading and tokenizing only about as much of the file as they need (not the file: a 10 MB file costs
    gigabytes tokenized whole). The ids are exactly those of the whole file tokenized at once: the prefix
    ends at whitespace, never inside a word, and holds ``_TOKEN_MARGIN`` tokens more than asked for.
    Errors as :func:`read_text`'s."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 1")
    pieces: list[str] = []
    length = tokenized_length = 0
    for piece in iter_text(path, chunk_bytes):
        pieces.append(piece)
        length += len(piece)
        if length < 2 * tokenized_length:  # tokenized again only once doubled: linear work in all
            continue
        text = "".join(pieces)
        pieces = [text]
        cut = max(text.rfind(space) for space in " \n\t\r")
        if cut <= 0:
            continue
        tokenized_length = length
        ids = tokenizer(text[:cut], add_special_tokens=False).input_ids
        if len(ids) >= max_tokens + _TOKEN_MARGIN:
            return text[:cut], ids[:max_tokens]
    text = "".join(pieces)
    _check_has_text(path, text)
    return text, tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]


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
