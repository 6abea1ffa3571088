"""Model-card templates live in the top-level model_cards/ folder: the dev (editable) install reads them from
there, and a built wheel ships them as hf_glu/model_cards/ so a plain, non-editable install finds them too."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from hf_glu.cards import CONVERSION_TEMPLATE, PLACEHOLDER_PATH, template_text

from helpers import REPO, tiny_source

TEMPLATES = REPO / "model_cards"
# What building a wheel reads: pyproject.toml, its readme, and the folders packaged (pyproject's package-dir).
BUILD_INPUTS = ["pyproject.toml", "README.md", "hf_glu", "model_cards"]


def _templates() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(TEMPLATES.glob("*.md"))}


def _source_packages() -> set[str]:
    """Every package of the checkout, named as installed: hf_glu and its sub-packages, and model_cards/."""
    packages = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "hf_glu").rglob("__init__.py")}
    return packages | {"hf_glu.model_cards"}


def test_dev_install_reads_templates_from_model_cards():
    templates = _templates()
    assert CONVERSION_TEMPLATE in templates
    assert template_text() == templates[CONVERSION_TEMPLATE]
    for name, text in templates.items():
        assert template_text(name) == text
    assert not (REPO / "hf_glu" / "model_cards").exists(), "templates belong in the top-level model_cards/"


def test_non_editable_install_ships_templates_and_renders_a_card(tmp_path):
    # Build from a copy of the build inputs, so nothing is written into the checkout (setuptools would leave
    # build/ there, whose stale files could end up in later wheels).
    source = tmp_path / "source"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(source)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("hf_glu-*.whl")

    # What `pip install .` puts in site-packages: the wheel's contents, unpacked.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    templates = _templates()
    for name in templates:
        assert f"hf_glu/model_cards/{name}" in names
    for package in _source_packages():  # pyproject.toml lists the packages: a new one must be added there
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"{package} is missing from the wheel"

    # A fresh process that imports hf_glu from the unpacked wheel (first on sys.path) and everything else
    # (torch, transformers, peft) from this venv, in an empty folder so the checkout is not importable.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = textwrap.dedent(
        f"""
        import json
        import hf_glu
        import hf_glu.model_cards
        from hf_glu.cards import render_conversion_card, template_text
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        names = {sorted(templates)!r}
        source = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32))
        report = hf_glu.convert_checkpoint(source, "geglu", eval_tokens=8).conversion_report
        print(json.dumps({{
            "hf_glu": hf_glu.__file__,
            "model_cards": hf_glu.model_cards.__file__,
            "default": template_text(),
            "templates": {{name: template_text(name) for name in names}},
            "card": str(render_conversion_card(report, model_name="tiny-pythia-geglu")),
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=run_dir, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["hf_glu"]).resolve() == (site / "hf_glu" / "__init__.py").resolve()
    assert Path(found["model_cards"]).resolve() == (site / "hf_glu" / "model_cards" / "__init__.py").resolve()
    assert found["default"] == templates[CONVERSION_TEMPLATE]
    assert found["templates"] == templates
    assert "# tiny-pythia-geglu" in found["card"] and "`GluGPTNeoXForCausalLM` subclasses" in found["card"]


# --- User-supplied names are text in the card, never code, headings or HTML --------------------

HOSTILE_DST = 'x") ; import os; os.system("id") #\n\n# Injected heading\n<img src=x onerror=alert(1)>'
HOSTILE_SRC = "src `` ` <b>bold</b> [link](javascript:alert(1))\n\n# Injected\n`"


def _parsed_card(folder: Path):
    """The card's metadata and its body as CommonMark tokens (nested inline tokens flattened after their block)."""
    from huggingface_hub import ModelCard

    markdown_it = __import__("pytest").importorskip("markdown_it")
    card = ModelCard.load(folder / "README.md")
    tokens = []
    for token in markdown_it.MarkdownIt("commonmark").parse(card.text):
        tokens += [token, *(token.children or [])]
    return card, tokens


def _headings(tokens) -> list[str]:
    """Each heading's text as rendered (escapes and entities decoded)."""
    inlines = [tokens[i + 1] for i, t in enumerate(tokens) if t.type == "heading_open"]
    return ["".join(c.content for c in inline.children if c.type == "text") for inline in inlines]


def _calls(code: str) -> list:
    import ast

    return [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]


def _convert(src: Path, dst: Path) -> None:
    from hf_glu.cli import main

    tiny_source("gpt_neox").save_pretrained(src)
    assert main(["convert", str(src), str(dst), "--variant", "geglu", "--no-eval"]) == 0


def test_hostile_src_and_dst_names_are_shown_as_text_and_never_pasted_into_code(tmp_path):
    _convert(tmp_path / "plain-src", tmp_path / "plain-dst")
    _convert(tmp_path / HOSTILE_SRC, tmp_path / HOSTILE_DST)
    plain_card, plain = _parsed_card(tmp_path / "plain-dst")
    card, tokens = _parsed_card(tmp_path / HOSTILE_DST)

    # The same headings as a plain card's: the title (the name, newlines shown as \n) and the template's own.
    assert _headings(tokens) == [HOSTILE_DST.replace("\n", "\\n"), *_headings(plain)[1:]]
    assert _headings(plain)[0] == "plain-dst"
    assert not [t for t in tokens if t.type.startswith("html")]
    links = [[t.attrGet("href") for t in parsed if t.type == "link_open"] for parsed in (plain, tokens)]
    assert links[0] == links[1], "a link made from a name"
    visible = "".join(t.content for t in tokens if t.type == "text")
    assert HOSTILE_SRC.replace("\n", "\\n") in visible  # shown in full, as text
    for token in tokens:  # no code holds any part of either name
        if token.type in ("code_inline", "fence", "code_block"):
            assert "os.system" not in token.content and "Injected" not in token.content, token.content
    assert (plain_card.data.model_name, card.data.model_name) == ("plain-dst", HOSTILE_DST.replace("\n", "\\n"))

    # The load snippets: a plain name is pasted as one properly quoted string; a name that is not a repo id is
    # replaced by the placeholder path.
    for parsed, expected in ((plain, "plain-dst"), (tokens, PLACEHOLDER_PATH)):
        snippets = [t.content for t in parsed if t.type == "fence" and t.info == "python"]
        snippets += [t.content for t in parsed if t.type == "code_inline" and "from_pretrained" in t.content]
        assert len(snippets) == 2
        for code in snippets:
            (call,) = [c for c in _calls(code) if getattr(c.func, "attr", None) == "from_pretrained"]
            assert len(_calls(code)) == 1 and len(call.args) == 1, code
            constant = call.args[0].value
            assert constant == expected, code


def _scheme_section(card: str) -> str:
    return card.split("## Init scheme")[1].split("## Fidelity")[0]


def test_the_card_says_exactly_only_when_the_measured_difference_is_zero():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import hf_glu
    from hf_glu.cards import render_conversion_card

    source = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=32))  # fmt: skip
    report = hf_glu.convert_checkpoint(source, "geglu", eval_tokens=8).conversion_report
    assert all(layer["unit_map"]["exact"] for layer in report["layers"])  # an exact map, whatever is measured
    zero = _scheme_section(str(render_conversion_card({**report, "max_abs_output_diff": 0.0}, model_name="m")))
    assert "exactly" in zero
    rounded = _scheme_section(str(render_conversion_card({**report, "max_abs_output_diff": 0.0371}, model_name="m")))
    assert "exactly" not in rounded and "0.0371" in rounded
    streamed = {k: v for k, v in report.items() if k not in ("max_abs_output_diff", "max_abs_logit_diff")}
    streamed["evaluation"] = "skipped (--no-eval): the model was never built or run"
    assert "exactly" not in _scheme_section(str(render_conversion_card(streamed, model_name="m")))
