"""Test setup for every test: offline Hub, a private datasets cache, deterministic seeds and thread counts, and the
fixtures several subjects share. Plain helpers live in helpers.py."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tokenized and packed blocks go to a fresh cache (set before `datasets` is imported), never the user's.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_glu-test-datasets-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_glu.data import builtin_corpus, train_bpe_tokenizer  # noqa: E402

from helpers import tiny_gpt2  # noqa: E402


@pytest.fixture
def gpt2_folder(tmp_path):
    """A tiny saved GPT-2 with its own tokenizer in ``tmp_path/src``, and a text file beside it (``text.txt``)."""
    folder = tmp_path / "src"
    tokenizer = train_bpe_tokenizer(builtin_corpus(5_000), vocab_size=101)
    tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "text.txt").write_text(builtin_corpus(3_000))
    return folder


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A saved tiny GPT2LMHeadModel with its own 300-token tokenizer and generation config, shared by a module's tests
    (read-only: copy it to change it)."""
    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = train_bpe_tokenizer(builtin_corpus(20_000), vocab_size=300)
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), spread=0.1)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that ``snapshot_download`` (offline) reads, so SRC may be a Hub id: fill it with
    ``helpers.hub_snapshot(saved_folder, <this>, "org/name")``."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Benchmarks run in-process by their smoke tests set torch's thread count for the rest of the process; a later
    test comparing logits bit for bit with a fresh process (which uses the default count) would then see other
    reduction orders. Each test starts with the count the process started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
