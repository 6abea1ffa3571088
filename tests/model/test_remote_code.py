"""Checkpoints carry their code: a process that cannot import hf_glu loads them with trust_remote_code."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import hf_glu
from hf_glu import GluForCausalLM, GluForSequenceClassification

from helpers import BLOCK_HF_GLU, tiny_config

PACKAGE = Path(hf_glu.__file__).parent
COPIED_FILES = ("configuration_glu.py", "modeling_glu.py", "glu.py", "glu_triton.py")


def _run_without_hf_glu(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HF_GLU + textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_saved_checkpoint_holds_the_code_and_a_complete_auto_map(tmp_path):
    GluForCausalLM(tiny_config()).save_pretrained(tmp_path)
    for name in COPIED_FILES:
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
    }


def _top_level_imports(tree: ast.Module):
    """Imports outside `try:` blocks (those inside are optional by design)."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def test_copied_files_import_only_torch_transformers_stdlib_and_each_other():
    allowed_roots = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for name in COPIED_FILES:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.level == 1 and f"{node.module}.py" in COPIED_FILES, (name, node.module)
        for node in _top_level_imports(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    continue
                assert module.split(".")[0] in allowed_roots, f"{name} imports {module} outside try:"


def test_process_without_hf_glu_loads_every_head_with_trust_remote_code(tmp_path):
    ids = torch.randint(1, 101, (2, 9))
    lm = GluForCausalLM(tiny_config(glu_variant="swiglu_oai")).eval()
    clf = GluForSequenceClassification(tiny_config(glu_variant="geglu", num_labels=3)).eval()
    lm.save_pretrained(tmp_path / "lm")
    clf.save_pretrained(tmp_path / "clf")
    with torch.no_grad():
        expected = {
            "ids": ids,
            "lm_logits": lm(ids).logits,
            "hidden": lm.transformer(ids).last_hidden_state,
            "clf_logits": clf(ids).logits,
        }
    torch.save(expected, tmp_path / "expected.pt")

    result = _run_without_hf_glu(
        """
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
        try:
            import hf_glu
            raise SystemExit("hf_glu was importable")
        except ImportError:
            pass
        e = torch.load("expected.pt")
        lm = AutoModelForCausalLM.from_pretrained("lm", trust_remote_code=True).eval()
        base = AutoModel.from_pretrained("lm", trust_remote_code=True).eval()
        clf = AutoModelForSequenceClassification.from_pretrained("clf", trust_remote_code=True).eval()
        assert "hf_glu" not in type(lm).__module__, type(lm).__module__
        with torch.no_grad():
            assert torch.equal(lm(e["ids"]).logits, e["lm_logits"]), "causal LM logits differ"
            assert torch.equal(base(e["ids"]).last_hidden_state, e["hidden"]), "base model output differs"
            assert torch.equal(clf(e["ids"]).logits, e["clf_logits"]), "classifier logits differ"
        print("REMOTE-CODE-OK", type(lm).__name__, type(base).__name__, type(clf).__name__)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK GluForCausalLM GluModel GluForSequenceClassification" in result.stdout


def test_process_without_hf_glu_and_without_trust_gets_transformers_clear_error(tmp_path):
    GluForCausalLM(tiny_config()).save_pretrained(tmp_path / "lm")
    result = _run_without_hf_glu(
        """
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained("lm")
        except ValueError as err:
            print("REFUSED:", err)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED:" in result.stdout and "trust_remote_code=True" in result.stdout
