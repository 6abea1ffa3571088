"""Packed causal-LM training blocks on `datasets`: documents from a file, a dataset name or the built-in
corpus; a deterministic held-out split; tokenization with ``Dataset.map`` (batched, parallel, cached);
blocks of ``block_size`` tokens packed across documents; ``streaming`` for corpora larger than memory,
each process training on its own part (``split_dataset_by_node``).

Map-style data is cached by `datasets` (tokenized documents and packed blocks), so a second run on the
same file and tokenizer reads them back instead of tokenizing again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import PartialState
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetGenerationError
from datasets.packaged_modules.generator.generator import Generator
from transformers import PreTrainedTokenizerBase

from .data import builtin_corpus, iter_token_blocks

# File suffix -> the `datasets` builder that reads it. Text files are split into paragraphs (blank lines).
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT = "text"
STREAM_EVAL_DOCUMENTS = 100  # documents held out of a stream unless told otherwise
# The held-out documents of a stream are read into memory, whole: past this many characters (a corpus that is one
# long line, say) they are refused rather than read on.
STREAM_EVAL_MAX_CHARS = 1 << 24
# A stream holds no whole document: it reads a text file this many characters at a time, and cuts a document
# longer than STREAM_PIECE_CHARS into pieces of at most that many characters (at a word boundary), each a row whose
# CONTINUES column says whether the next row goes on with the same document (the EOS token comes after the
# last piece only). Its filters and tokenization take _STREAM_BATCH rows at a time: a bounded number of
# characters whatever the documents (a 50 MB line tokenized whole takes gigabytes).
_STREAM_CHUNK_CHARS = 1 << 20
STREAM_PIECE_CHARS = 1 << 13
_STREAM_BATCH = 64
CONTINUES = "continues"
# Stored blocks hold int32 token ids (half the cache); a stream's are never stored and come out as int64
# tensors, the dtype embeddings and the loss take.
_BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
_STREAM_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"))})

Documents = datasets.Dataset | datasets.IterableDataset
logger = logging.getLogger(__name__)


def load_documents(
    train_file: str | Path | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    *,
    split: str = "train",
    text_column: str = TEXT,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> Documents:
    """Documents with one column, ``text``: the paragraphs of a .txt file, the ``text_column`` of a
    .json/.jsonl/.csv/.parquet file or of a `datasets` dataset (a Hub name or a local folder), or, when
    neither is given, the paragraphs of the built-in corpus. ``streaming`` returns an ``IterableDataset``
    that reads lazily, in pieces: a document longer than ``STREAM_PIECE_CHARS`` characters comes as several rows,
    all but the last marked in the ``continues`` column."""
    if train_file is not None and dataset is not None:
        raise ValueError("pass either a training file or a dataset name, not both")
    cache = str(cache_dir) if cache_dir is not None else None
    if streaming:
        documents = _stream_documents(train_file, dataset, dataset_config, split, text_column, cache)
        return documents.map(
            _document_pieces, batched=True, batch_size=_STREAM_BATCH, remove_columns=documents.column_names or [TEXT]
        )
    if dataset is not None:
        documents = datasets.load_dataset(dataset, dataset_config, split=split, cache_dir=cache)
        source = f"dataset {dataset!r}"
    elif train_file is not None:
        path = Path(train_file)
        builder = _builder_for(path)
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        documents = _load_file(builder, path, cache_dir=cache, **options)
        source = str(path)
    else:
        return _builtin_documents()
    return _only_text_column(documents, text_column, source)


def _load_file(builder: str, path: Path, **options) -> Documents:
    """The ``builder`` reader's rows of ``path``; a file it cannot read is bad input, named."""
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except DatasetGenerationError as error:  # e.g. bytes that are not UTF-8, a malformed JSON line
        raise ValueError(f"training file {str(path)!r} could not be read as {builder}: {error.__cause__}") from error


def _builtin_documents() -> datasets.Dataset:
    return datasets.Dataset.from_dict({TEXT: [p for p in builtin_corpus().split("\n\n") if p.strip()]})


def _stream_documents(
    train_file: str | Path | None,
    dataset: str | None,
    dataset_config: str | None,
    split: str,
    text_column: str,
    cache: str | None,
) -> datasets.IterableDataset:
    """``load_documents``' sources read lazily; a text file by ``_text_file_pieces``, never a whole paragraph."""
    if dataset is not None:
        documents = datasets.load_dataset(dataset, dataset_config, split=split, streaming=True, cache_dir=cache)
        return _only_text_column(documents, text_column, f"dataset {dataset!r}")
    if train_file is None:
        return _builtin_documents().to_iterable_dataset()
    path = Path(train_file)
    builder = _builder_for(path)
    if builder != "text":
        return _only_text_column(_load_file(builder, path, streaming=True), text_column, str(path))
    if text_column != TEXT:
        raise ValueError(f"{str(path)} has no column {text_column!r}; its columns: ['text'] (pick one: --text-column)")
    features = datasets.Features({TEXT: datasets.Value("string"), CONTINUES: datasets.Value("bool")})
    return datasets.IterableDataset.from_generator(
        _text_file_pieces, features=features, gen_kwargs={"paths": [str(path)]}
    )


def _text_file_pieces(paths: list[str]) -> Iterator[dict]:
    """The paragraphs (blank-line separated, as the `datasets` text reader's) of text files, read
    ``_STREAM_CHUNK_CHARS`` characters at a time; a paragraph longer than ``STREAM_PIECE_CHARS`` comes in pieces."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                pending = ""  # the start of a paragraph whose end is not read yet; never longer than a piece
                while chunk := file.read(_STREAM_CHUNK_CHARS):
                    *paragraphs, pending = (pending + chunk).split("\n\n")
                    for paragraph in paragraphs:
                        if paragraph:
                            yield {TEXT: paragraph, CONTINUES: False}
                    start = 0
                    # Cut strictly inside `pending`, which holds no blank line: no piece ends half of one.
                    while len(pending) - start > STREAM_PIECE_CHARS:
                        cut = _word_cut(pending, start)
                        yield {TEXT: pending[start:cut], CONTINUES: True}
                        start = cut
                    pending = pending[start:]
                if pending:
                    yield {TEXT: pending, CONTINUES: False}
        except UnicodeDecodeError as error:
            raise ValueError(f"training file {path!r} could not be read as text: {error}") from error


def _word_cut(text: str, start: int) -> int:
    """Where the piece of ``text`` from ``start`` ends: before the last whitespace within ``STREAM_PIECE_CHARS``
    (so a word keeps the space in front of it, as byte-level BPE pre-splits text), or at the limit if none."""
    end = start + STREAM_PIECE_CHARS
    cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end), text.rfind("\t", start + 1, end))
    return cut if cut > start else end


def _document_pieces(batch: dict[str, list]) -> dict[str, list]:
    """Rows of at most ``STREAM_PIECE_CHARS`` characters: a longer text cut at word boundaries, every piece but the
    last marked as continued (a row that was itself continued keeps that mark on its last piece)."""
    texts, continues = [], []
    for text, continued in zip(batch[TEXT], batch.get(CONTINUES) or itertools.repeat(False), strict=False):
        start = 0
        while isinstance(text, str) and len(text) - start > STREAM_PIECE_CHARS:
            cut = _word_cut(text, start)
            texts.append(text[start:cut])
            continues.append(True)
            start = cut
        texts.append(text[start:] if start else text)  # not a str: _has_text names it
        continues.append(continued)
    return {TEXT: texts, CONTINUES: continues}


def _builder_for(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"training file {str(path)!r} does not exist")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"training file {str(path)!r} has an unknown type; expected one of {sorted(_BUILDERS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"training file {str(path)!r} is empty; expected some text")
    return builder


def _only_text_column(documents: Documents, text_column: str, source: str) -> Documents:
    columns = documents.column_names
    if columns is not None and text_column not in columns:  # a stream may not know its columns yet
        raise ValueError(f"{source} has no column {text_column!r}; its columns: {columns} (pick one: --text-column)")
    documents = documents.select_columns([text_column])
    documents = _every_row_has_text(documents, text_column, source)
    return documents.rename_column(text_column, TEXT) if text_column != TEXT else documents


def _every_row_has_text(documents: Documents, column: str, source: str) -> Documents:
    """Refuse a row whose text is missing (a JSON line without the field reads as null), naming the first:
    dropping such rows without a word would train on less than the user gave. Checked in the Arrow column of a
    map-style dataset; a stream is checked as it is read."""
    if isinstance(documents, datasets.IterableDataset):
        check = _RowsWithText(column, source)
        return documents.filter(check, batched=True, with_indices=True, batch_size=_STREAM_BATCH)
    offset = 0
    for batch in documents.with_format("arrow").iter(batch_size=100_000):
        nulls = pc.is_null(batch[column])
        if pc.any(nulls).as_py():
            raise ValueError(_missing_text(source, offset + pc.index(nulls, True).as_py(), column))
        offset += len(batch)
    return documents


def _missing_text(source: str, row: int, column: str) -> str:
    return (
        f"{source}: row {row + 1} (counting from 1) has no {column!r} field, or it is null; every row needs its "
        "text there (another field: --text-column)"
    )


class _RowsWithText:
    """A stream's filter that keeps every row and raises at the first without text (``_every_row_has_text``)."""

    def __init__(self, column: str, source: str) -> None:
        self.column, self.source = column, source

    def __call__(self, batch: dict[str, list], indices: list[int]) -> list[bool]:
        for text, row in zip(batch[self.column], indices, strict=True):
            if text is None:
                raise ValueError(_missing_text(self.source, row, self.column))
        return [True] * len(indices)


def split_held_out(documents: datasets.Dataset, eval_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Leading documents for training, the rest held out: the cut is the last document boundary within
    the first ``1 - eval_fraction`` of the characters (``data.split_train_eval`` on the documents joined
    by blank lines), so no document is in both and the split never changes between runs."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction!r} is invalid; expected a number in (0, 1)")
    documents = documents.filter(_has_text, batched=True)
    lengths = np.concatenate(
        [pc.utf8_length(batch[TEXT]).to_numpy() for batch in documents.with_format("arrow").iter(batch_size=10_000)]
        or [np.zeros(0, dtype=np.int64)]
    )
    separator = 2  # the blank line that joins two documents
    separator_ends = np.cumsum(lengths + separator)[:-1]  # where the blank line after document i ends
    total = int(lengths.sum()) + separator * max(len(lengths) - 1, 0)
    cut = int(total * (1 - eval_fraction))
    n_train = int(np.searchsorted(separator_ends, cut, side="right"))
    if n_train == 0 or n_train == len(lengths):
        raise ValueError(
            f"cannot hold out {eval_fraction:.0%} of {len(lengths)} document(s) at a document boundary; "
            "use more text or another --eval-fraction"
        )
    return documents.select(range(n_train)), documents.select(range(n_train, len(lengths)))


def split_held_out_stream(
    documents: datasets.IterableDataset, eval_documents: int
) -> tuple[datasets.IterableDataset, datasets.Dataset]:
    """A stream's first ``eval_documents`` non-empty documents held out (read into memory), the rest for
    training: a stream's length is unknown, so its tail cannot be held out without reading it all. A document
    the stream brings in pieces (``load_documents``) is held out with all of them: counted by document, not
    by row, so no part of a held-out document is ever trained on."""
    if eval_documents < 1:
        raise ValueError(f"eval_documents={eval_documents!r} is invalid; expected an integer >= 1")
    documents = documents.filter(_has_text, batched=True, batch_size=_STREAM_BATCH)
    held_out = list(_first_documents(documents, eval_documents))
    if not held_out:
        raise ValueError("the stream has no document to hold out for evaluation; expected some text")
    # Left out by content, not with skip(N): split between processes by file, a stream would apply the skip to
    # each process's own files (about N / processes each) instead of to the N documents held out. (A copy of a
    # held-out document elsewhere in the corpus is left out too, which keeps the evaluation honest.)
    held_out_texts = {row[TEXT] for row in held_out}
    rest = documents.filter(
        lambda batch: [text not in held_out_texts for text in batch[TEXT]], batched=True, batch_size=_STREAM_BATCH
    )
    return rest, datasets.Dataset.from_list(held_out)


def _first_documents(rows: Iterable[dict], count: int) -> Iterator[dict]:
    """The rows of the first ``count`` documents: a row the next continues (``CONTINUES``) does not end one.
    More than ``STREAM_EVAL_MAX_CHARS`` characters in all is refused, as soon as they are read."""
    ended = chars = 0
    for row in rows:
        chars += len(row[TEXT])
        if chars > STREAM_EVAL_MAX_CHARS:
            raise ValueError(
                f"the first {count} document(s) of the stream, held out for evaluation, hold more than "
                f"{STREAM_EVAL_MAX_CHARS:,} characters (a document of a .txt runs to the next blank line); hold out "
                "fewer with --eval-documents, or give the corpus shorter documents"
            )
        yield row
        ended += not row.get(CONTINUES, False)
        if ended == count:
            return


def _has_text(batch: dict[str, list]) -> list[bool]:
    for text in batch[TEXT]:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"a document's text is a {type(text).__name__} ({text!r:.40}); expected a string")
    return [bool(text and text.strip()) for text in batch[TEXT]]


def tokenize_documents(
    documents: Documents, tokenizer: PreTrainedTokenizerBase, *, num_proc: int | None = None
) -> Documents:
    """Token ids of every document with the EOS token appended, the separator of packed documents (a piece
    of a document that the next row continues gets none: see ``load_documents``)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate packed documents")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[TEXT], add_special_tokens=False)["input_ids"]
        continued = batch.get(CONTINUES) or [False] * len(ids)
        return {"input_ids": [row if more else row + [eos] for row, more in zip(ids, continued, strict=True)]}

    if isinstance(documents, datasets.Dataset):
        options = {"num_proc": num_proc, "desc": "tokenizing"}
    else:
        options = {"batch_size": _STREAM_BATCH}
    return documents.map(tokenize, batched=True, remove_columns=documents.column_names or [TEXT], **options)


def _packed_rows(tokenized: Iterable[dict], block_size: int) -> Iterator[dict[str, list[int]]]:
    rows = (row["input_ids"] for row in tokenized)
    for block in iter_token_blocks(rows, block_size):
        yield {"input_ids": block}


def pack_blocks(tokenized: Documents, block_size: int, cache_dir: str | Path | None = None) -> Documents:
    """Full blocks of ``block_size`` tokens cut from the documents' tokens in order (the last, partial
    block dropped), as ``data.pack_token_blocks`` does in memory. Map-style blocks are written to (and
    on a second run read from) the `datasets` cache; a stream packs lazily as it is read."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} is invalid; expected an integer >= 2")
    kwargs = {"tokenized": tokenized, "block_size": block_size}
    if isinstance(tokenized, datasets.IterableDataset):
        stream = datasets.IterableDataset.from_generator(_packed_rows, features=_STREAM_FEATURES, gen_kwargs=kwargs)
        return stream.map(_with_labels, batched=True).with_format("torch")
    blocks = _cached_blocks(kwargs, cache_dir)
    if len(blocks) == 0:
        raise ValueError(f"the text makes fewer tokens than one block of {block_size}")
    # Labels are made when a row is read, not stored: the cache holds each token once.
    return blocks.with_transform(_causal_lm_tensors)


def _cached_blocks(gen_kwargs: dict, cache_dir: str | Path | None) -> datasets.Dataset:
    """The packed blocks from the `datasets` cache (packed and written there on a first run), checked against the
    row count recorded when they were written: an Arrow file cut short reads as fewer blocks without an error,
    or fails to read. Either way it is rebuilt, with one line naming it."""
    builder = Generator(
        cache_dir=str(cache_dir) if cache_dir else None,
        features=_BLOCK_FEATURES,
        generator=_packed_rows,
        gen_kwargs=gen_kwargs,
        split=datasets.Split.TRAIN,
    )
    builder.download_and_prepare()
    written = builder.info.splits[datasets.Split.TRAIN].num_examples
    try:
        blocks = builder.as_dataset(split=datasets.Split.TRAIN)
        damage = None if len(blocks) == written else f"{len(blocks)} blocks where {written} were written"
    except (OSError, pa.ArrowException) as error:  # e.g. "Expected to be able to read ... bytes"
        damage = " ".join(str(error).split())
    if damage is None:
        return blocks
    files = sorted(str(path) for path in Path(builder.cache_dir).glob("*.arrow"))
    logger.warning("packing cache %s is damaged (%s); rebuilding it", ", ".join(files), damage)
    builder.download_and_prepare(download_mode=datasets.DownloadMode.FORCE_REDOWNLOAD)
    return builder.as_dataset(split=datasets.Split.TRAIN)


def _with_labels(batch: dict[str, list]) -> dict[str, list]:
    return {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}


def _causal_lm_tensors(batch: dict[str, list]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def build_block_datasets(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    train_file: str | Path | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_column: str = TEXT,
    eval_fraction: float = 0.1,
    streaming: bool = False,
    eval_documents: int = STREAM_EVAL_DOCUMENTS,
    shuffle_buffer: int = 0,
    seed: int = 0,
    endless: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Documents, datasets.Dataset]:
    """Train and held-out causal-LM examples (``input_ids`` and ``labels``, the same tokens: the model's
    loss shifts them), ready for ``default_data_collator``. Map-style: the tail ``eval_fraction`` of the
    text is held out, tokenized and packed once, by the main process first (the others then read the
    cache). ``streaming``: the first ``eval_documents`` are held out and the training stream is split between
    processes before packing (``rank`` of ``world_size``), so no two processes ever see the same document, nor
    a block made from one; ``shuffle_buffer`` > 0 draws blocks at random from a buffer of that many (seeded by
    ``seed`` and the epoch, so a resumed run sees the same order); ``endless`` makes the stream start over
    when it ends (``endless_stream``)."""
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer!r} is invalid; expected 0 (off) or a number of blocks")
    documents = load_documents(
        train_file, dataset, dataset_config, text_column=text_column, streaming=streaming, cache_dir=cache_dir
    )
    if streaming:
        train_docs, eval_docs = split_held_out_stream(documents, eval_documents)
        if world_size > 1:
            train_docs = split_dataset_by_node(train_docs, rank=rank, world_size=world_size)
        train = pack_blocks(tokenize_documents(train_docs, tokenizer), block_size)
        if shuffle_buffer:
            train = train.shuffle(seed=seed, buffer_size=shuffle_buffer)
        if endless:
            train = endless_stream(train, f"after the first {eval_documents} documents held out")
        return train, _packed_part(tokenize_documents(eval_docs, tokenizer), block_size, cache_dir, "eval")
    with PartialState().main_process_first():
        train_docs, eval_docs = split_held_out(documents, eval_fraction)
        parts = {}
        for part, docs in (("train", train_docs), ("eval", eval_docs)):
            tokenized = tokenize_documents(docs, tokenizer, num_proc=num_proc)
            parts[part] = _packed_part(tokenized, block_size, cache_dir, part)
    return parts["train"], parts["eval"]


def endless_stream(stream: datasets.IterableDataset, what: str = "") -> datasets.IterableDataset:
    """A stream of blocks (as ``pack_blocks`` makes them) pass after pass, never ending (epoch 0, 1, … for its
    shuffle): a run is then one pass that ``max_steps`` ends, so its step count alone says where in the data it
    is (a resumed Trainer skips that many batches within one pass), and no last, partial group of batches is
    ever topped up with earlier blocks. ``what`` completes the error raised when a pass is empty."""
    passes = datasets.IterableDataset.from_generator(
        _passes, gen_kwargs={"stream": stream.with_format(None), "what": what}
    )
    return passes.with_format("torch")  # as pack_blocks' streams


def _passes(stream: datasets.IterableDataset, what: str) -> Iterator[dict]:
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        empty = True
        for row in stream:
            empty = False
            yield row
        if empty:
            raise ValueError(f"the training stream makes no full block {what}; use more text or a smaller block size")


def _packed_part(
    tokenized: datasets.Dataset, block_size: int, cache_dir: str | Path | None, part: str
) -> datasets.Dataset:
    try:
        return pack_blocks(tokenized, block_size, cache_dir)
    except ValueError as error:
        raise ValueError(f"the {part} split is too small: {error}; use more text or a smaller --block-size") from error
