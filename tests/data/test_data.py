"""Text sources and packing."""

import pytest

from hf_glu.data import builtin_corpus, iter_text, pack_token_blocks, read_text, split_train_eval, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(builtin_corpus(max_chars=50_000), vocab_size=400)


def test_builtin_corpus_is_deterministic_english_prose():
    text = builtin_corpus(max_chars=20_000)
    assert text == builtin_corpus(max_chars=20_000)
    assert 10_000 < len(text) <= 20_000
    assert text.count(" the ") > 50


def test_split_keeps_every_character_and_cuts_at_a_paragraph(tmp_path):
    text = builtin_corpus(max_chars=30_000)
    train, held_out = split_train_eval(text, 0.2)
    assert train + "\n\n" + held_out == text
    assert 0.15 < len(held_out) / len(text) < 0.3


def test_tokenizer_round_trips_text(tokenizer):
    sample = "Return a new dictionary with the keys sorted."
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 0


def test_packing_makes_full_blocks_separated_by_eos(tokenizer):
    texts = ["first document here", "second one", "and a third document of text"]
    blocks = pack_token_blocks(texts, tokenizer, block_size=4)
    stream = [t for b in blocks for t in b]
    assert all(len(b) == 4 for b in blocks)
    expected = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        expected += ids + [tokenizer.eos_token_id]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 4


def test_packing_refuses_text_shorter_than_a_block(tokenizer):
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_token_blocks(["hi"], tokenizer, block_size=512)


def test_text_is_read_in_pieces_that_join_to_the_file(tmp_path):
    """Blocks of 5 bytes cut multi-byte characters: the pieces still join to the decoded file, whose UTF-8
    byte-order mark is dropped."""
    text = "naïve café — ünïcödé ✓ " * 40
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    pieces = list(iter_text(path, chunk_bytes=5))
    assert len(pieces) > 100 and "".join(pieces) == text == read_text(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text".encode("utf-32"), "is UTF-32 (it starts with the UTF-32 byte-order mark)"),
        ("text".encode("utf-16-be"), "holds NUL bytes (the first at byte offset 0)"),
        ("a" * 10 + "é", None),  # whole: accepted
        (b"a" * 10 + "é".encode()[:1], "not UTF-8 (invalid byte at offset 10)"),  # cut short at the end
        (b"ab\x80cd", "not UTF-8 (invalid byte at offset 2)"),
    ],
)
def test_text_that_is_not_utf8_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "odd.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if message is None:
        assert read_text(path) == content
        return
    with pytest.raises(ValueError) as refused:
        read_text(path)
    assert f"text file '{path}' " in str(refused.value) and message in str(refused.value)
    assert "expected UTF-8 text" in str(refused.value)
