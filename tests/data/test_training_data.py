"""The `datasets` pipeline of training blocks: the same blocks as the in-memory packing, streaming,
per-process splitting, the cache, and bad input."""

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, default_data_collator

from hf_glu import training_data
from hf_glu.data import builtin_corpus, pack_token_blocks, split_train_eval, train_bpe_tokenizer
from hf_glu.training_data import build_block_datasets, load_documents

BLOCK = 32


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(builtin_corpus(max_chars=50_000), vocab_size=400)


@pytest.fixture(scope="module")
def numbered_text(tmp_path_factory):
    """Documents that each name a unique number, so any block tells which documents it came from."""
    path = tmp_path_factory.mktemp("numbered") / "numbered.txt"
    docs = [f"Document {i:04d} says number {i:04d} twice." for i in range(400)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _rows(blocks) -> list[list[int]]:
    return [row["input_ids"].tolist() if torch.is_tensor(row["input_ids"]) else row["input_ids"] for row in blocks]


def _doc_numbers(tokenizer, blocks) -> set[str]:
    # Whole four-digit numbers only: a block boundary may cut one into pieces.
    return {
        word for row in _rows(blocks) for word in tokenizer.decode(row).split() if word.isdigit() and len(word) == 4
    }


def test_builtin_corpus_gives_the_same_blocks_as_the_in_memory_packing(tokenizer, tmp_path):
    train, held_out = build_block_datasets(tokenizer, 64, cache_dir=tmp_path)
    paragraphs = [p for p in builtin_corpus().split("\n\n") if p.strip()]
    train_text, eval_text = split_train_eval("\n\n".join(paragraphs), 0.1)
    assert _rows(train) == pack_token_blocks(train_text.split("\n\n"), tokenizer, 64)
    assert _rows(held_out) == pack_token_blocks(eval_text.split("\n\n"), tokenizer, 64)
    example = train[3]
    assert example["input_ids"].dtype == torch.long and torch.equal(example["input_ids"], example["labels"])
    batch = default_data_collator([train[0], train[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 64)


def test_text_file_keeps_train_and_held_out_documents_apart(tokenizer, numbered_text, tmp_path):
    train, held_out = build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, eval_fraction=0.2)
    assert len(train) > 3 * len(held_out) > 0
    train_docs, eval_docs = _doc_numbers(tokenizer, train), _doc_numbers(tokenizer, held_out)
    assert not train_docs & eval_docs
    assert max(map(int, train_docs)) < min(map(int, eval_docs))  # the held-out part is the tail


def test_streaming_holds_out_the_first_documents_and_packs_the_rest_lazily(tokenizer, numbered_text):
    train, held_out = build_block_datasets(
        tokenizer, BLOCK, train_file=numbered_text, streaming=True, eval_documents=40
    )
    docs = numbered_text.read_text(encoding="utf-8").strip().split("\n\n")
    assert _rows(held_out) == pack_token_blocks(docs[:40], tokenizer, BLOCK)
    rows = _rows(train)
    assert rows == pack_token_blocks(docs[40:], tokenizer, BLOCK)
    assert next(iter(train))["labels"].tolist() == rows[0]


def test_a_shuffled_stream_holds_the_same_blocks_in_a_seeded_order(tokenizer, numbered_text):
    def stream(seed: int) -> list[list[int]]:
        train, _ = build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True,
                                        eval_documents=40, shuffle_buffer=16, seed=seed)  # fmt: skip
        return _rows(train)

    in_order = _rows(build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True,
                                          eval_documents=40)[0])  # fmt: skip
    shuffled = stream(seed=0)
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    assert stream(seed=0) == shuffled and stream(seed=1) != shuffled


def test_streaming_reads_only_what_it_uses(tokenizer, tmp_path):
    # Past the stream's first 1 MiB chunk this file is not UTF-8: reading it all fails, a stream's first
    # blocks do not.
    path = tmp_path / "long.txt"
    path.write_bytes("".join(f"Paragraph {i} of a long file.\n\n" for i in range(100_000)).encode() + b"\xff\xfe")
    assert path.stat().st_size > 2 << 20
    train, _ = build_block_datasets(tokenizer, BLOCK, train_file=path, streaming=True, eval_documents=5)
    first = [row["input_ids"] for row in itertools.islice(train, 10)]
    assert len(first) == 10 and all(len(ids) == BLOCK for ids in first)
    with pytest.raises(ValueError, match="long.txt' could not be read as text: 'utf-8' codec"):
        build_block_datasets(tokenizer, BLOCK, train_file=path, cache_dir=tmp_path / "cache")


def test_two_ranks_never_see_the_same_document(tokenizer, numbered_text):
    per_rank = [
        build_block_datasets(
            tokenizer, BLOCK, train_file=numbered_text, streaming=True, eval_documents=40, rank=rank, world_size=2
        )[0]
        for rank in (0, 1)
    ]
    seen = [_doc_numbers(tokenizer, stream) for stream in per_rank]
    assert not seen[0] & seen[1]
    everything = _doc_numbers(
        tokenizer,
        build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True, eval_documents=40)[0],
    )
    assert len(seen[0] | seen[1]) >= len(everything) - 4  # each rank drops at most its last partial block


def test_a_multi_file_stream_split_between_ranks_never_trains_on_held_out_documents(tokenizer, tmp_path):
    # Two files over two ranks: split by file, the skip past the held-out documents would land on each rank's
    # own file (3 + 3) instead of on the 6 documents held out from the first file.
    folder = tmp_path / "two_files"
    folder.mkdir()
    for f in (1, 2):
        rows = [json.dumps({"text": f"Document {f}{i:03d} says number {f}{i:03d} twice."}) for i in range(60)]
        (folder / f"part{f}.jsonl").write_text("\n".join(rows) + "\n")
    held_out = set()
    seen = []
    for rank in (0, 1):
        train, evaluation = build_block_datasets(tokenizer, BLOCK, dataset=str(folder), streaming=True,
                                                 eval_documents=6, rank=rank, world_size=2)  # fmt: skip
        held_out = _doc_numbers(tokenizer, evaluation) | held_out
        seen.append(_doc_numbers(tokenizer, train))
    assert held_out and held_out <= {f"1{i:03d}" for i in range(6)}
    assert not (seen[0] | seen[1]) & held_out and not seen[0] & seen[1]
    assert {"1006", "2000", "2001", "2002"} <= seen[0] | seen[1]  # no document skipped in their place
    assert {n[0] for n in seen[0]} == {"1"} and {n[0] for n in seen[1]} == {"2"}  # each rank reads its own file


def test_an_endless_stream_starts_over_and_names_an_empty_one(tokenizer, numbered_text):
    one_pass, _ = build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True, eval_documents=40)
    rows = _rows(one_pass)
    endless, _ = build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True,
                                      eval_documents=40, endless=True)  # fmt: skip
    assert _rows(itertools.islice(endless, 2 * len(rows) + 1)) == rows + rows + rows[:1]
    empty, _ = build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True,
                                    eval_documents=10_000, endless=True)  # fmt: skip
    with pytest.raises(ValueError, match="no full block after the first 10000 documents held out"):
        next(iter(empty))


def test_accelerate_gives_each_process_its_own_part_of_a_stream(tokenizer, numbered_text):
    # The recipes' path: one unsplit stream, Accelerate shards it per process (batches not dispatched). With
    # drop_last, as the recipes set it; without, Accelerate would even out the last round with the first blocks.
    train, _ = build_block_datasets(tokenizer, BLOCK, train_file=numbered_text, streaming=True, eval_documents=40)
    per_rank = []
    for rank in (0, 1):
        loader = prepare_data_loader(
            DataLoader(train, batch_size=2, collate_fn=default_data_collator, drop_last=True),
            num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False,
        )  # fmt: skip
        per_rank.append([batch["input_ids"].tolist() for batch in loader])
    # Batches alternate between the processes: every block of the stream goes to exactly one of them.
    interleaved = [row for pair in zip(*per_rank, strict=False) for batch in pair for row in batch]
    assert len(per_rank[0]) > 10 and interleaved == _rows(train)[: len(interleaved)]
    assert len(interleaved) >= len(_rows(train)) - 4


_CACHED_RUN = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    from hf_glu.training_data import build_block_datasets

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    train, held_out = build_block_datasets(tokenizer, 32, train_file=sys.argv[2], cache_dir=sys.argv[3])
    print(json.dumps({"files": [f["filename"] for f in train.cache_files], "n": len(train)}))
    """
)


def test_a_second_run_reads_the_cache(tokenizer, numbered_text, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    cache = tmp_path / "cache"
    train, _ = build_block_datasets(
        AutoTokenizer.from_pretrained(tmp_path / "tok"), 32, train_file=numbered_text, cache_dir=cache
    )
    first = {"files": [f["filename"] for f in train.cache_files], "n": len(train)}
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}
    # Another process (a later run) with the same file and tokenizer finds the tokenized, packed blocks.
    out = subprocess.run(
        [sys.executable, "-c", _CACHED_RUN, str(tmp_path / "tok"), str(numbered_text), str(cache)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first and first["n"] > 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")} == files  # nothing tokenized or packed again


def test_reads_jsonl_and_csv_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x y"}) + "\n" + json.dumps({"body": "z"}) + "\n")
    docs = load_documents(tmp_path / "a.jsonl", text_column="body", cache_dir=tmp_path / "c")
    assert docs.column_names == ["text"] and docs["text"] == ["x y", "z"]
    (tmp_path / "b.csv").write_text("id,text\n1,hello there\n2,general\n")
    assert load_documents(tmp_path / "b.csv", cache_dir=tmp_path / "c")["text"] == ["hello there", "general"]


def test_bad_input_names_what_is_wrong(tokenizer, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body'\].*--text-column"):
        load_documents(tmp_path / "a.jsonl", cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(ValueError, match=r"unknown type.*\.jsonl"):
        load_documents(tmp_path / "notes.docx")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "tiny.txt").write_text("A few words.\n\nAnd a few more.", encoding="utf-8")
    with pytest.raises(ValueError, match="train split is too small.*--block-size"):
        build_block_datasets(tokenizer, 512, train_file=tmp_path / "tiny.txt", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"eval_fraction=1.5 is invalid.*\(0, 1\)"):
        build_block_datasets(tokenizer, BLOCK, eval_fraction=1.5)
    (tmp_path / "numbers.jsonl").write_text(json.dumps({"text": 7}) + "\n")
    for streaming in (False, True):
        with pytest.raises(ValueError, match="a document's text is a int.*expected a string"):
            build_block_datasets(tokenizer, BLOCK, train_file=tmp_path / "numbers.jsonl", streaming=streaming,
                                 cache_dir=tmp_path / "c")  # fmt: skip
    with pytest.raises(ValueError, match="either a training file or a dataset"):
        load_documents(tmp_path / "tiny.txt", dataset="wikitext")


def test_a_stream_reads_and_packs_a_long_document_in_pieces(tokenizer, tmp_path, monkeypatch):
    # Pieces of 40 characters read 64 at a time: every document below spans several reads and pieces, and blank
    # lines fall across reads. The stream must hold no row longer than a piece, keep every character, and pack
    # the same tokens as the documents whole, with the EOS token after each document's last piece only.
    monkeypatch.setattr(training_data, "STREAM_PIECE_CHARS", 40)
    monkeypatch.setattr(training_data, "_STREAM_CHUNK_CHARS", 64)
    docs = [" ".join(f"w{d}x{i}" for i in range(n)) for d, n in enumerate((60, 3, 25, 40))]
    docs[2] = "unbroken" * 12  # no word boundary: cut at the limit
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    rows = list(load_documents(path, streaming=True))
    assert max(len(row["text"]) for row in rows) <= 40 and len(rows) > 10
    ends = [i for i, row in enumerate(rows) if not row["continues"]]
    assert len(ends) == len(docs) and ends[-1] == len(rows) - 1
    starts = [0] + [i + 1 for i in ends[:-1]]
    assert ["".join(row["text"] for row in rows[a : b + 1]) for a, b in zip(starts, ends, strict=True)] == docs
    train, held_out = build_block_datasets(tokenizer, 8, train_file=path, streaming=True, eval_documents=1)
    assert _rows(train) == pack_token_blocks(docs[1:], tokenizer, 8)  # the first document held out whole
    assert _rows(held_out) == pack_token_blocks(docs[:1], tokenizer, 8)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_stream_holds_out_whole_documents_not_pieces(tokenizer, tmp_path, monkeypatch, suffix):
    """--streaming --eval-documents N holds out N documents: a long one cut into pieces is held out with all its
    pieces, none of which is trained on (the split counted pieces: a long first document's other pieces went to
    training)."""
    monkeypatch.setattr(training_data, "STREAM_PIECE_CHARS", 50)
    monkeypatch.setattr(training_data, "_STREAM_CHUNK_CHARS", 64)
    docs = [" ".join(f"held{d}w{i}" for i in range(n)) for d, n in enumerate((40, 30))]
    docs += [" ".join(f"train{d}w{i}" for i in range(25)) for d in range(4)]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    train, held_out = build_block_datasets(tokenizer, 8, train_file=path, streaming=True, eval_documents=2)
    train_text = "".join(tokenizer.decode(row) for row in _rows(train))
    assert "held" not in train_text and "train3w24" in train_text
    assert _rows(held_out) == pack_token_blocks(docs[:2], tokenizer, 8)
    assert _rows(train) == pack_token_blocks(docs[2:], tokenizer, 8)


def test_held_out_documents_longer_than_the_limit_are_refused_unread(tokenizer, tmp_path, monkeypatch):
    """Held out whole, a stream's first documents are read into memory: a corpus that is one long line would be
    read whole. Past STREAM_EVAL_MAX_CHARS they are refused, reading stopped there."""
    monkeypatch.setattr(training_data, "STREAM_PIECE_CHARS", 50)
    monkeypatch.setattr(training_data, "_STREAM_CHUNK_CHARS", 64)
    monkeypatch.setattr(training_data, "STREAM_EVAL_MAX_CHARS", 1000)
    path = tmp_path / "one-line.txt"
    path.write_text("short first document\n\n" + " ".join(f"w{i}" for i in range(2000)), encoding="utf-8")
    read = []
    original = training_data._text_file_pieces

    def counted(paths):
        for row in original(paths):
            read.append(row)
            yield row

    monkeypatch.setattr(training_data, "_text_file_pieces", counted)
    with pytest.raises(ValueError, match=r"the first 2 document\(s\) of the stream, held out .* more than 1,000 char"):
        build_block_datasets(tokenizer, 8, train_file=path, streaming=True, eval_documents=2)
    assert sum(len(row["text"]) for row in read) < 3000  # of about 11,000
    build_block_datasets(tokenizer, 8, train_file=path, streaming=True, eval_documents=1)  # the short one: fine
