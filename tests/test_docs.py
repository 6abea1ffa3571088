"""The docs stay true: every test, file, option and make target they name exists, and their cheap commands run.

Reads README.md, recipes/README.md, benchmarks/README.md, tests/README.md and docs/*.md as a reader would: a claim
that goes stale (a renamed test, a removed option, a snippet that no longer runs) fails here.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

import hf_glu.hub as hub
from hf_glu.cli import build_parser, main
from hf_glu.data import builtin_corpus, train_bpe_tokenizer

from helpers import FAMILY_CONFIGS, TINY_FIELDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    p for p in [ROOT / "README.md", ROOT / "recipes" / "README.md", ROOT / "benchmarks" / "README.md",
                ROOT / "tests" / "README.md", *(ROOT / "docs").glob("**/*.md")] if p.is_file()
)  # fmt: skip
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Options of programs that are not ours, named where the docs show how to launch or install.
FOREIGN_OPTIONS = {
    "--nproc_per_node", "--num_processes", "--multi_gpu", "--config_file", "--cpu", "--no-deps", "--model-impl",
    "--host", "--port", "--help", "--index-url",
}  # fmt: skip


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _blocks(language: str | None = None) -> list[tuple[Path, str]]:
    return [(doc, body) for doc in DOCS for lang, body in FENCE.findall(_text(doc)) if language in (None, lang)]


def _hf_glu_lines() -> list[tuple[Path, list[str]]]:
    """Every ``hf-glu …`` command in the docs' code blocks, as argv (comments and placeholders dropped)."""
    lines = []
    for doc, body in _blocks():
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("hf-glu ") and "…" not in line:
                lines.append((doc, shlex.split(line)[1:]))
    return lines


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(_text(path))
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_test_the_docs_cite_exists_and_defines_what_they_name():
    cited = {(doc.name, m[0], m[1]) for doc in DOCS
             for m in re.findall(r"(tests/[\w/.-]+\.py)(?:::(\w+))?", _text(doc))}  # fmt: skip
    assert cited
    wrong = [c for c in cited if not (ROOT / c[1]).is_file() or (c[2] and c[2] not in _defined_names(ROOT / c[1]))]
    assert not wrong, f"docs cite tests that do not exist: {sorted(wrong)}"


def test_every_file_the_docs_link_or_name_exists():
    named = set()
    for doc in DOCS:
        text = _text(doc)
        for link in re.findall(r"\]\(([^)#\s]+)", text):
            if not re.match(r"[a-z]+:", link):
                named.add((doc, (doc.parent / link).resolve()))
        for path in re.findall(r"`((?:hf_glu|recipes|benchmarks|model_cards|docs|tests)/[\w/.-]*\.\w+)`", text):
            named.add((doc, ROOT / path))
    assert named
    missing = sorted(f"{doc.name}: {path}" for doc, path in named if not path.exists())
    assert not missing, f"docs name files that do not exist: {missing}"


def _code_options() -> set[str]:
    """Every option our programs define: hf-glu's parsers, and each "--option" literal in the package, recipes,
    benchmarks and the distributed test scripts."""
    options = set()
    for path in [*ROOT.glob("hf_glu/**/*.py"), *ROOT.glob("recipes/*.py"), *ROOT.glob("benchmarks/*.py"),
                 *ROOT.glob("benchmarks/*.sh"), *ROOT.glob("tests/distributed/*.py")]:  # fmt: skip
        options.update(re.findall(r"[\"'](--[a-z][\w-]*)[\"'=]", _text(path)))
    # The compile check builds one flag per scope from its SCOPES table.
    tree = ast.parse(_text(ROOT / "benchmarks" / "gpu_compile.py"))
    scopes = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "SCOPES" for t in n.targets))  # fmt: skip
    return options | {f"--{scope}" for scope in scopes}


def test_every_option_the_docs_name_is_defined_by_the_program_they_name():
    named = {(doc.name, opt) for doc in DOCS for opt in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", _text(doc))}
    defined = _code_options() | FOREIGN_OPTIONS
    unknown = sorted(n for n in named if n[1] not in defined)
    assert not unknown, f"docs name options nothing defines: {unknown}"


def test_every_hf_glu_command_in_the_docs_parses():
    lines = _hf_glu_lines()
    assert {argv[0] for _, argv in lines} >= {"convert", "eval", "push"}
    parser = build_parser()
    for doc, argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.name}: `hf-glu {shlex.join(argv)}` does not parse")


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([\w-]+):", _text(ROOT / "Makefile"), re.M))
    named = {(doc.name, t) for doc in DOCS for t in re.findall(r"`make ([\w-]+)", _text(doc))}
    assert named and not {n for n in named if n[1] not in targets}, sorted(n for n in named if n[1] not in targets)


@pytest.mark.parametrize("command", [name for name in build_parser()._subparsers._group_actions[0].choices])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: hf-glu {command}" in capsys.readouterr().out


def test_the_model_family_snippet_runs_as_written(tmp_path):
    snippet = next(body for _, body in _blocks("python") if "GluForCausalLM(config)" in body)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tiny-swiglu" / "config.json").is_file() and "tensor([[" in result.stdout


def _family_of_example(src: str) -> str:
    """The model type a documented source stands for: its row in the README's family table, else its last name."""
    for row in re.findall(r"^\| `([\w-]+)` \| ([^|]+)\|", _text(ROOT / "README.md"), re.M):
        if f"`{src}`" in row[1]:
            return row[0]
    name = Path(src).name
    assert name in FAMILY_CONFIGS or name == "gpt2", f"no tiny stand-in for the documented source {src!r}"
    return name


def _tiny_stand_in(model_type: str, folder: Path, tokenizer) -> None:
    """A small random checkpoint of ``model_type`` with a tokenizer, where the docs name a real one."""
    torch.manual_seed(0)
    if model_type == "gpt2":
        config = GPT2Config(**{**TINY_FIELDS, "vocab_size": len(tokenizer)})
    else:
        config = FAMILY_CONFIGS[model_type]()
        config.vocab_size = len(tokenizer)
    model = GPT2LMHeadModel(config) if model_type == "gpt2" else _causal_lm(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _causal_lm(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()))


class _RecordingHub:
    """Stands in for the Hub API: ``push`` checks the folder, then would create the repo and upload it."""

    def __init__(self):
        self.uploaded: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.uploaded.append(repo_id)


def test_the_readme_surgery_commands_run_on_tiny_stand_ins(tmp_path, monkeypatch, capsys):
    """The README's convert / eval / push block, line by line as written, with a tiny checkpoint of the same family
    where it names a real one, a short text where it names a file, and a recording stand-in for the Hub."""
    block = next(body for doc, body in _blocks("bash") if doc.name == "README.md" and "hf-glu convert" in body)
    monkeypatch.chdir(tmp_path)
    api = _RecordingHub()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    tokenizer = train_bpe_tokenizer(builtin_corpus(20_000), vocab_size=300)
    ran = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line.startswith("hf-glu "):
            continue
        argv = shlex.split(line)[1:]
        if argv[0] == "convert" and not Path(argv[1]).exists():
            _tiny_stand_in(_family_of_example(argv[1]), Path(argv[1]), tokenizer)
        if "--text-file" in argv:
            text_file = Path(argv[argv.index("--text-file") + 1])
            text_file.parent.mkdir(parents=True, exist_ok=True)
            text_file.write_text(builtin_corpus(4_000), encoding="utf-8")
        assert main(argv) == 0, f"`{line}` failed: {capsys.readouterr().err}"
        ran.append(argv[0])
    assert ran.count("convert") >= 2 and "eval" in ran and "push" in ran and api.uploaded
