"""Shared test setup and helpers: offline Hub, deterministic seeds, tiny configs and models (GLU and GPT-2), a recording
stand-in for the Hub API, and the checks every refused command must pass."""

import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tokenized and packed blocks go to a fresh cache (set before `datasets` is imported), never the user's.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_glu-test-datasets-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

import hf_glu  # noqa: E402
from hf_glu.cli import main  # noqa: E402

# The shape every tiny test model shares, GPT-2 source or GLU: dropout off so outputs are deterministic.
TINY_FIELDS = dict(
    vocab_size=101,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

# Prepended to a child process's script: any import of hf_glu then fails as if it were not installed.
BLOCK_HF_GLU = textwrap.dedent(
    """
    import sys

    class _BlockHfGlu:
        def find_spec(self, name, path=None, target=None):
            if name == "hf_glu" or name.startswith("hf_glu."):
                raise ImportError(f"hf_glu is blocked in this process ({name})")
            return None

    sys.meta_path.insert(0, _BlockHfGlu())
    """
)


def tiny_config(**overrides) -> hf_glu.GluConfig:
    """A GLU decoder small enough for many CPU tests per second."""
    return hf_glu.GluConfig(**{**TINY_FIELDS, "n_inner": 48, **overrides})


def tiny_gpt2(cls=GPT2LMHeadModel, spread: float = 0.2, **overrides):
    """A tiny GPT-2 whose weights are spread wider than init, so activations reach GELU's curved range."""
    config = GPT2Config(**{**TINY_FIELDS, "num_labels": 3, **overrides})
    config._attn_implementation = "eager"  # reorder_and_upcast_attn only acts on the eager path
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    return model.eval()


class FakeHfApi:
    """Records calls instead of talking to the Hub; snapshots the list of files the real ``upload_folder`` would
    send at call time (its own listing and pattern filter)."""

    def __init__(self):
        self.calls = []
        self.uploaded_files = None

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

        self.calls.append(("upload_folder", repo_id, kwargs))
        root = Path(folder_path).resolve()
        listed = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
        ignored = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]
        self.uploaded_files = list(filter_repo_objects(listed, allow_patterns=allow_patterns, ignore_patterns=ignored))


def assert_reloads_without_hf_glu(models: dict, tmp_path) -> None:
    """Save each model under its key, then load every one in a process that cannot import hf_glu, through the
    checkpoint's own code (``trust_remote_code``): each must give exactly the logits it gave here."""
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = {}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = BLOCK_HF_GLU + textwrap.dedent(
        """
        import torch
        from transformers import AutoModelForCausalLM
        e = torch.load("expected.pt")
        for name, logits in e["logits"].items():
            load = dict(trust_remote_code=True, attn_implementation="eager")
            model = AutoModelForCausalLM.from_pretrained(name, **load).eval()
            assert "hf_glu" not in type(model).__module__, type(model).__module__
            with torch.no_grad():
                assert torch.equal(model(e["ids"]).logits, logits), f"{name}: logits differ"
            print("LOADED", name)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("LOADED") == len(models)


@pytest.fixture
def gpt2_folder(tmp_path):
    """A tiny saved GPT-2 with its own tokenizer in ``tmp_path/src``, and a text file beside it (``text.txt``)."""
    from hf_glu.data import builtin_corpus, train_bpe_tokenizer

    folder = tmp_path / "src"
    tokenizer = train_bpe_tokenizer(builtin_corpus(5_000), vocab_size=101)
    tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "text.txt").write_text(builtin_corpus(3_000))
    return folder


def ragged_rows(n: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Causal-LM rows with different numbers of targets (row i ignores its last 3·i labels), so per-token
    and per-row averages of the loss differ."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(1, TINY_FIELDS["vocab_size"], (length,), generator=g)
        labels = ids.clone()
        if i:
            labels[length - 3 * i :] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return rows


def one_sgd_step_args(output_dir, batch: int, accumulation: int) -> TrainingArguments:
    """Trainer arguments for exactly one plain-SGD update with no clipping, so runs that differ only in
    how the batch is split must end with the same weights."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
    )


def train_steps(model, optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """``steps`` optimizer steps of causal-LM loss on the batch ``ids``; the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def tree(root) -> dict[str, str]:
    """Every path under ``root`` with its content hash (files), its target (links) or ``dir``."""
    listing = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            listing[key] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            listing[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            listing[key] = "dir"
    return listing


def refused(args: list[str], root, capsys, *fragments: str) -> str:
    """Run ``hf-glu ARGS``: exit 2, one line holding every fragment, nothing under ``root`` changed."""
    before = tree(root)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("hf-glu")]  # beside Transformers' progress bars
    assert code == 2 and len(ours) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in ours[0], ours[0]
    assert tree(root) == before
    return ours[0]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that ``snapshot_download`` (offline) reads, so SRC may be a Hub id: fill it with
    ``hub_cache.hub_snapshot(saved_folder, <this>, "org/name")``."""
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
