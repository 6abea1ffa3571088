"""Transformers' own model tests (``ModelTesterMixin``) on the GLU classes of six families, beside the stock ones.

The mixin ships in the Transformers source distribution of the installed version (``tests/test_modeling_common.py``,
not in the wheel). It is fetched once from the package index with pip into a cache folder
(``$HF_GLU_TRANSFORMERS_TESTS``, default ``~/.cache/hf-glu/transformers-tests/<version>``) and imported from there;
without network or without ``parameterized`` (the mixin's own dependency) the tests skip, saying why. The per-family
testers of Transformers (``tests/models/<family>/``) are not in the sdist: the tester here builds each family's tiny
config from ``tests/helpers.py``, and the GLU class gets the same config with a SwiGLU MLP.

Each test runs one mixin test on the stock classes and on the GLU classes (base model and causal LM) of a family:
a test that passes on the stock classes must pass on the GLU ones; one that does not pass on the stock classes
proves nothing here and is skipped, naming the stock outcome. ``UPSTREAM_TESTS`` is the subset run: saving and
loading, initialisation on the meta device, capability answers and attention dispatch, embeddings, outputs.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers

from hf_glu import FAMILIES, GLU_FAMILY_CONFIGS, GLU_FAMILY_MODELS

from helpers import FAMILY_CONFIGS

FAMILIES_UNDER_TEST = ("gpt_neox", "opt", "falcon", "gpt_bigcode", "gptj", "phi")

# The mixin's tests run here (each on the base model and the causal LM, stock and GLU): the ones this package can
# break (saving, loading, initialising, the capability flags, attention dispatch, embeddings, outputs). Left out:
# accelerator-only and multi-GPU tests, generation (GenerationTesterMixin is not in the sdist), test_training (the
# mixin adds labels only for class names listed in Transformers' own name tables), and, for time (~90 s in all on
# two CPU cores), the output-shape tests (test_model_outputs_equivalence, test_hidden_states_output,
# test_attention_outputs), test_resize_tokens_embeddings and test_all_tensors_are_parameter_or_buffer: all five
# pass on the GLU classes of these six families too (checked with Transformers 5.25).
UPSTREAM_TESTS = (
    "test_save_load",
    "test_torch_save_load",
    "test_can_init_all_missing_weights",
    "test_init_weights_can_init_buffers",
    "test_can_be_initialized_on_meta",
    "test_from_pretrained_no_checkpoint",
    "test_save_load_keys_to_ignore_on_save",
    "test_correct_missing_keys",
    "test_base_model_prefix_loads_base_weights",
    "test_can_use_safetensors",
    "test_load_save_without_tied_weights",
    "test_tied_weights_keys",
    "test_model_weights_reload_no_missing_tied_weights",
    "test_load_with_mismatched_shapes",
    "test_tp_plan_matches_params",
    "test_reverse_loading_mapping",
    "test_can_load_from_already_mapped_keys",
    "test_model_get_set_embeddings",
    "test_model_main_input_name",
    "test_model_base_model_prefix",
    "test_determinism",
    "test_inputs_embeds",
    "test_gradient_checkpointing_enable_disable",
    "test_config_attn_implementation_setter",
    "test_can_set_attention_dynamically",
    "test_sdpa_can_dispatch_non_composite_models",
)

_HEADS = ("AutoModel", "AutoModelForCausalLM")
# What Transformers' test package imports from modules its sdist does not ship; the mixin needs neither.
_ABSENT_TEST_MODULES = {"exporters.test_export": "ExportTesterMixin", "generation.test_utils": "GenerationTesterMixin"}
_PACKAGE = "_hf_glu_transformers_tests"


def _cache_folder() -> Path:
    default = Path.home() / ".cache" / "hf-glu" / "transformers-tests"
    return Path(os.environ.get("HF_GLU_TRANSFORMERS_TESTS") or default) / transformers.__version__


def _fetch_upstream_tests(folder: Path) -> None:
    """Puts the top-level test modules of the installed Transformers' sdist into ``folder`` (pip, once)."""
    version = transformers.__version__
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", scratch, f"transformers=={version}"]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
            pytest.skip(f"Transformers {version}'s sdist (its test mixins) could not be fetched with pip: {error}")
        sdist = next(Path(scratch).glob("transformers-*.tar.gz"))
        staged = Path(scratch) / "tests"
        staged.mkdir()
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts  # transformers-X/tests/<name>.py: the top level only
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (staged / parts[2]).write_bytes(archive.extractfile(member).read())
        if not (staged / "test_modeling_common.py").is_file():
            pytest.skip(f"Transformers {version}'s sdist has no tests/test_modeling_common.py")
        staged.replace(folder)  # whole or not at all: a concurrent run finds either nothing or every file


@pytest.fixture(scope="module")
def mixin() -> type:
    """Transformers' ``ModelTesterMixin``, from the sdist of the installed version."""
    pytest.importorskip("parameterized", reason="Transformers' test mixins need `parameterized` (pip install it)")
    folder = _cache_folder()
    if not (folder / "test_modeling_common.py").is_file():
        _fetch_upstream_tests(folder)
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[_PACKAGE] = package
        for dotted, class_name in _ABSENT_TEST_MODULES.items():
            for depth in range(1, dotted.count(".") + 2):
                name = f"{_PACKAGE}.{'.'.join(dotted.split('.')[:depth])}"
                sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
            setattr(sys.modules[f"{_PACKAGE}.{dotted}"], class_name, type(class_name, (), {}))
    with warnings.catch_warnings():  # the module's custom pytest marks, registered in Transformers' own conftest
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(f"{_PACKAGE}.test_modeling_common").ModelTesterMixin


class _Tester:
    """What the mixin asks of a family's tester: a tiny config and inputs for it."""

    batch_size = 2
    seq_length = 7
    is_training = True

    def __init__(self, config: transformers.PretrainedConfig):
        self.config = config
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads

    def get_config(self) -> transformers.PretrainedConfig:
        return copy.deepcopy(self.config)

    def prepare_config_and_inputs_for_common(self) -> tuple[transformers.PretrainedConfig, dict]:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # one left-padded row
        return self.get_config(), {"input_ids": ids, "attention_mask": mask}


def _glu_config(model_type: str) -> transformers.PretrainedConfig:
    source = FAMILY_CONFIGS[model_type]().to_dict()
    dropped = ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")
    return GLU_FAMILY_CONFIGS[model_type](**{k: v for k, v in source.items() if k not in dropped}, glu_variant="swiglu")


@functools.cache
def _test_case(mixin: type, model_type: str, kind: str) -> type[unittest.TestCase]:
    family = FAMILIES[model_type]
    if kind == "glu":
        config = _glu_config(model_type)
        classes = tuple(GLU_FAMILY_MODELS[model_type][auto] for auto in _HEADS)
    else:
        config = FAMILY_CONFIGS[model_type]()
        classes = tuple(getattr(transformers, family.heads[auto]) for auto in _HEADS)

    def set_up(self):
        self.model_tester = _Tester(config)

    namespace = {
        "all_model_classes": classes,
        "setUp": set_up,
        # Run the meta-device init check on every family, not only those added from 2023 (the mixin's default).
        "test_can_init_all_missing_weights_before_2023": True,
    }
    return type(f"{kind.capitalize()}{family.config}Test", (mixin, unittest.TestCase), namespace)


def _getfile_as_family(real_getfile):
    """``inspect.getfile`` answering for each GLU config class with its family config's file. The mixin's meta-device
    init test runs only for models whose config file carries a copyright year from 2023 (Transformers 5.17 has no
    opt-in flag): a GLU class is as old as its family."""
    family_configs = {glu: next(c for c in glu.__mro__ if c.__module__.startswith("transformers.")) for glu in
                      GLU_FAMILY_CONFIGS.values()}  # fmt: skip

    def getfile(obj):
        return real_getfile(family_configs.get(obj, obj))

    return getfile


def _outcome(case_class: type[unittest.TestCase], test_name: str) -> tuple[str, str]:
    """``("passed" | "skipped" | "failed", detail)`` of one mixin test."""
    result = unittest.TestResult()
    with mock.patch.object(inspect, "getfile", _getfile_as_family(inspect.getfile)):
        case_class(test_name).run(result)
    if result.skipped:
        return "skipped", result.skipped[0][1]
    for _, trace in result.errors + result.failures:
        if "_pytest.outcomes.Skipped" in trace or "Skipped:" in trace.splitlines()[-1]:  # pytest.skip inside
            return "skipped", trace.splitlines()[-1]
        return "failed", trace
    return "passed", ""


@pytest.mark.parametrize("test_name", UPSTREAM_TESTS)
@pytest.mark.parametrize("model_type", FAMILIES_UNDER_TEST)
def test_upstream_model_test_passes_on_glu_classes_where_it_passes_on_stock(mixin, model_type, test_name):
    if not hasattr(mixin, test_name):
        pytest.skip(f"Transformers {transformers.__version__}'s ModelTesterMixin has no {test_name}")
    stock, stock_detail = _outcome(_test_case(mixin, model_type, "stock"), test_name)
    glu, glu_detail = _outcome(_test_case(mixin, model_type, "glu"), test_name)
    if stock != "passed":
        pytest.skip(f"{stock} on the stock classes too: {stock_detail.strip().splitlines()[-1][:300]}")
    assert glu == "passed", f"{test_name} passes on the stock {model_type} classes, {glu} on GLU's:\n{glu_detail}"
