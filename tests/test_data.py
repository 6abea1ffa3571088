"""Text sources and packing."""

import pytest

from hf_glu.data import builtin_corpus, pack_token_blocks, split_train_eval, train_bpe_tokenizer


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
