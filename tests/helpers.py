"""What the tests share, in one place: tiny configs and models (GLU, GPT-2 and one source per family), the checks a
refused command must pass, a recording stand-in for the Hub API, a Hub-cache snapshot built by hand, closed forms of
the variants written independently of hf_glu.glu, and the recipes' command line. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import hf_glu
from hf_glu import FAMILIES
from hf_glu.cli import main
from hf_glu.convert.init_schemes import EXACT_SOURCES
from hf_glu.glu import GluParams
from hf_glu.hub import BLOCK_HF_GLU

REPO = Path(__file__).resolve().parents[1]

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


# --- One tiny source model per GPT-2-style family, each with its unusual options switched on ---------------------

_COMMON = dict(vocab_size=101, bos_token_id=0, eos_token_id=0, pad_token_id=0)

# model_type -> the config of a tiny source exercising what is unusual about the family
FAMILY_CONFIGS = {
    # local attention on every other layer, tied head
    "gpt_neo": lambda: tf.GPTNeoConfig(
        **_COMMON, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
        attention_types=[[["global", "local"], 1]], window_size=4, resid_dropout=0.0, embed_dropout=0.0,
        attention_dropout=0.0,
    ),
    # partial rotary, parallel attention + MLP, untied head
    "gptj": lambda: tf.GPTJConfig(
        **_COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    "codegen": lambda: tf.CodeGenConfig(
        **_COMMON, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # partial rotary, sequential residual (parallel is the default), untied head
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=False,
    ),
    # multi-query attention
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(
        **_COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, multi_query=True, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # partial rotary, q/k layer norms, parallel block, biased untied head
    "phi": lambda: tf.PhiConfig(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, partial_rotary_factor=0.5, qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0,
    ),
    # new decoder architecture (grouped KV, two norms), bias-free
    "falcon": lambda: tf.FalconConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2, ffn_hidden_size=48, bias=False, max_position_embeddings=64,
    ),
    # post-LN, projected embeddings, inline MLP
    "opt": lambda: tf.OPTConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False, dropout=0.0,
    ),
    # ALiBi, residual added inside the MLP
    "bloom": lambda: tf.BloomConfig(**_COMMON, hidden_size=32, n_layer=2, n_head=4),
    # grouped KV, sliding window
    "starcoder2": lambda: tf.Starcoder2Config(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4, use_bias=True, residual_dropout=0.0,
    ),
    # ALiBi, bias-free, residual inside the MLP
    "mpt": lambda: tf.MptConfig(**_COMMON, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, no_bias=True),
    # scaled embeddings, inline MLP
    "biogpt": lambda: tf.BioGptConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, scale_embedding=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ),
    "xglm": lambda: tf.XGLMConfig(
        **_COMMON, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4, max_position_embeddings=64, dropout=0.0,
    ),
    # Conv1D projections, post-LN
    "openai-gpt": lambda: tf.OpenAIGPTConfig(
        **_COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # the MLP as an nn.Sequential, embeddings scaled by sqrt(width)
    "ctrl": lambda: tf.CTRLConfig(
        **_COMMON, n_positions=64, n_embd=32, dff=48, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
    ),
    # bias-free MLP, width as a multiple of the hidden size
    "gpt_neox_japanese": lambda: tf.GPTNeoXJapaneseConfig(
        **_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
        max_position_embeddings=64,
    ),
    # squared ReLU, q/k layer norms, partial rotary
    "persimmon": lambda: tf.PersimmonConfig(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, qk_layernorm=True, partial_rotary_factor=0.5,
    ),
    # squared ReLU, grouped KV, bias-free MLP
    "nemotron": lambda: tf.NemotronConfig(
        **_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, partial_rotary_factor=0.5,
    ),
}  # fmt: skip

# The eight families the README names first (GPT-Neo, GPT-J, GPT-NeoX, BigCode, Phi, Falcon, OPT, BLOOM).
CORE_FAMILIES = ("gpt_neo", "gptj", "gpt_neox", "gpt_bigcode", "phi", "falcon", "opt", "bloom")


def exact_variant(model_type: str, config) -> str:
    """The GLU variant that reproduces the family's activation exactly."""
    activation = FAMILIES[model_type].activation(config)
    return next(variant for variant, sources in EXACT_SOURCES.items() if activation in sources)


def tiny_source(model_type: str, auto_class: str = "AutoModelForCausalLM", spread: float = 0.2, **overrides):
    """A tiny family model whose weights are spread wider than init, so the activation's curve matters."""
    config = FAMILY_CONFIGS[model_type]()
    # Question answering needs 2 labels (start, end): 5.17's GPT-J sizes its QA layer by num_labels.
    labels = 2 if auto_class == "AutoModelForQuestionAnswering" else 3
    for key, value in {"num_labels": labels, **overrides}.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    model = getattr(tf, FAMILIES[model_type].heads[auto_class])(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * spread)
    return model.eval()


# --- The Hub cache's layout -----------------------------------------------------------------------------------
# A checkpoint laid out exactly as huggingface_hub's cache lays out a downloaded snapshot, built by hand (no network):
#
#     <cache>/models--<org>--<name>/
#         blobs/<sha256 of the content>           the files' bytes
#         refs/main                               the revision (40 hex digits, no newline)
#         snapshots/<revision>/<file>             relative links: ../../blobs/<sha256> (deeper for subfolders)
#
# ``snapshot_download(repo_id, cache_dir=<cache>)`` offline resolves ``refs/main`` and returns the snapshot folder;
# Transformers loads it like any folder. Every route that reads a source is tested on this layout.


def hub_snapshot(saved: Path, cache: Path, repo_id: str = "org/tiny") -> Path:
    """Copy the saved checkpoint folder ``saved`` into the Hub cache ``cache`` as the snapshot of ``repo_id``'s
    ``main``; returns the snapshot folder (``saved`` is left as it is)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in saved.rglob("*") if p.is_file())
    hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    revision = hashlib.sha1("".join(f"{p.relative_to(saved)}:{h}" for p, h in hashes.items()).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    for path, digest in hashes.items():
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(saved)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # ../../blobs/<sha256>, as huggingface_hub writes
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# --- Closed forms of every variant, derived by hand (float64) ---------------------------------------------------

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
PARAMS = GluParams(beta=1.3, alpha=1.702, limit=2.5)  # a small limit so the clamps are exercised


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _phi(z):  # standard normal density
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _cdf(z):
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _tanh_inner(z):
    return SQRT_2_OVER_PI * (z + 0.044715 * z**3)


def closed_form(name, g, u, p=PARAMS):
    """(out, d out/d gate, d out/d up) of each variant, derived by hand."""
    if name == "glu":
        s = _sig(g)
        return u * s, u * s * (1 - s), s
    if name == "bilinear":
        return u * g, u, g
    if name == "reglu":
        pos = (g > 0).double()
        return u * g * pos, u * pos, g * pos
    if name == "geglu":
        return u * g * _cdf(g), u * (_cdf(g) + g * _phi(g)), g * _cdf(g)
    if name == "geglu_tanh":
        t = torch.tanh(_tanh_inner(g))
        act = 0.5 * g * (1 + t)
        dact = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * g * g)
        return u * act, u * dact, act
    if name == "swiglu":
        s = _sig(p.beta * g)
        act = g * s
        return u * act, u * (s + p.beta * g * s * (1 - s)), act
    if name == "swiglu_oai":
        gc = torch.minimum(g, torch.tensor(p.limit, dtype=g.dtype))
        uc = u.clamp(-p.limit, p.limit)
        s = _sig(p.alpha * gc)
        act = gc * s
        dact = (s + p.alpha * gc * s * (1 - s)) * (g < p.limit).double()
        return (uc + 1) * act, (uc + 1) * dact, act * ((u > -p.limit) & (u < p.limit)).double()
    raise AssertionError(name)


# --- The fine-tuning recipes as a user runs them -------------------------------------------------------------

RECIPES = REPO / "recipes"
# Small and quick: 32-token blocks of a 20k-character text, a 2-layer model of width 32.
_RECIPE_SIZE_ARGS = ["--block-size", "32", "--batch-size", "4", "--eval-fraction", "0.2", "--lr", "3e-3"]


def recipe_command(script: str, assets: Path, output_dir: Path, *args: str, launcher=(sys.executable,)) -> list[str]:
    data = ["--train-file", str(assets / "train.txt"), *_RECIPE_SIZE_ARGS]
    return [*launcher, str(RECIPES / script), *data, "--output-dir", str(output_dir), *args]


# --- Conversions as a user runs them -------------------------------------------------------------------------------

# The two ways a conversion writes DST: in memory with the fidelity pass, and streamed tensor by tensor.
ROUTES = {"in-memory": ["--eval-tokens", "16"], "streamed": ["--no-eval"]}


def run_cli(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """``hf-glu ARGS`` in a fresh process (after the Python ``prelude``, or only the prelude when ARGS is empty)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    command = [sys.executable, "-c", prelude + "from hf_glu.cli import main; raise SystemExit(main())", *args]
    if prelude and not args:
        command = [sys.executable, "-c", prelude]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def saved_family(path: Path, family: str = "gpt_neox", **overrides) -> Path:
    """A tiny source of ``family`` saved in ``path``."""
    tiny_source(family, **overrides).save_pretrained(path)
    return path


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def damaged_copy(tmp_path: Path, folder: Path, damage: str) -> Path:
    """A copy of the saved GPT-2 ``folder`` in ``tmp_path/bad-<damage>`` with one damage: ``missing-weights``,
    ``corrupt`` (truncated), ``shape`` (an MLP weight one column short), ``nan`` (an inf in it), ``bin`` (the weights
    as a legacy pickle), ``pickle`` (a pickle that would call code), ``model-type`` (claims to be a Llama)."""
    copy = tmp_path / f"bad-{damage}"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    weights = copy / "model.safetensors"
    if damage == "missing-weights":
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage in ("shape", "nan", "bin", "pickle"):
        state = load_file(weights)
        key = next(k for k in state if k.endswith("mlp.c_fc.weight"))
        if damage == "shape":
            state[key] = state[key][:, :-1].contiguous()
        if damage == "nan":
            state[key][0, 0] = float("inf")
        save_file(state, weights)
        if damage in ("bin", "pickle"):
            weights.unlink()
            payload = state if damage == "bin" else {"x": os.system}  # a pickle that would call code
            torch.save(payload, copy / "pytorch_model.bin")
    elif damage == "model-type":
        config = json.loads((copy / "config.json").read_text())
        config["model_type"] = "llama"
        (copy / "config.json").write_text(json.dumps(config))
    return copy


# --- The benchmark scripts, imported as modules ------------------------------------------------------------------


def load_benchmark(script: str) -> ModuleType:
    """``benchmarks/<script>.py`` imported as the module ``<script>_under_test``: registered in ``sys.modules``
    (dataclasses look their module up by name), with benchmarks/ on ``sys.path`` while it imports its siblings."""
    folder = str(REPO / "benchmarks")
    spec = importlib.util.spec_from_file_location(f"{script}_under_test", REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module
