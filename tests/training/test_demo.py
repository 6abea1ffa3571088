"""``hf-glu demo --quick`` end to end: the exact conversion starts at the source's perplexity, fine-tuning
improves both conversions, the checkpoints reload in a fresh process, and the plot is a real PNG."""

import ast
import json
from pathlib import Path

import pytest

import hf_glu.demo
from hf_glu.demo import DEMO_VARIANTS, PLOT_FILE, RESULTS_FILE, run_demo
from hf_glu.hub import check_checkpoint_folders

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "hf-glu-demo"
    # One thread: on a shared CI runner, two contended threads can run many times slower than one.
    results = run_demo(output_dir=out, quick=True, threads=1)
    return out, results


def test_results_file_holds_what_run_demo_returned(demo):
    out, results = demo
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["status"] == "done"
    assert saved["perplexity"] == results["perplexity"]
    assert [row["stage"] for row in saved["table"]][0] == "pretrained"


def test_exact_variant_starts_at_the_source_perplexity(demo):
    _, results = demo
    ppl = results["perplexity"]
    assert ppl["converted"]["geglu_tanh"]["step_0"] == pytest.approx(ppl["source"], rel=1e-3)


def test_fine_tuning_lowers_the_converted_models_perplexity(demo):
    _, results = demo
    for variant in DEMO_VARIANTS:
        ppl = results["perplexity"]["converted"][variant]
        assert ppl["finetuned"] < ppl["step_0"], variant


def test_every_checkpoint_folder_would_load(demo):
    out, _ = demo
    stages = ("converted", "finetuned")
    names = ["source", "source-finetuned", *(f"{stage}-{v}" for v in DEMO_VARIANTS for stage in stages)]
    check_checkpoint_folders([out / name for name in names])
    for name in names:
        assert (out / name / "tokenizer.json").is_file(), name


def test_fresh_process_reloads_without_hf_glu_and_samples_text(demo):
    _, results = demo
    fresh = results["fresh_process"]
    assert fresh["hf_glu_imported"] is False
    assert len(fresh["samples"]) == len(DEMO_VARIANTS)
    for sample in fresh["samples"].values():
        assert sample["class"] == "GluForCausalLM"
        assert sample["sample"].strip()


def test_loss_curve_png_is_written(demo):
    out, results = demo
    png = out / PLOT_FILE
    assert results["plot"] == str(png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3


def test_a_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no results.json"):
        run_demo(output_dir=tmp_path, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(("option", "message"), [({"threads": 0}, "threads=0"), ({"variants": ["nope"]}, "'nope'")])
def test_bad_options_are_refused_before_any_work(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        run_demo(output_dir=tmp_path / "out", quick=True, **option)
    assert not (tmp_path / "out").exists()


def test_cli_demo_refuses_a_foreign_folder_with_one_line_and_exit_2(tmp_path, capsys):
    from hf_glu.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-glu demo: error:") and "results.json" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_demo_module_does_not_import_the_cli():
    """The CLI calls the demo, never the other way: no import cycle between hf_glu/cli.py and hf_glu/demo.py."""
    tree = ast.parse(Path(hf_glu.demo.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {"cli", "hf_glu.cli"} & imported, imported
