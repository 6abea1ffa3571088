"""Publishing a checkpoint folder to the Hugging Face Hub, after checking that it would load.

The check runs before anything touches the network: a folder without its config, its weights or the
code files its ``auto_map`` names would upload fine and then fail for every user who loads it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from huggingface_hub import HfApi
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

# Prepended to a child process's script: any import of hf_glu there then fails as it would where hf-glu is not
# installed (the tests' remote-code checks use it too).
BLOCK_HF_GLU = """
import sys

class BlockHfGlu:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_glu" or name.startswith("hf_glu."):
            raise ImportError(f"{name} is not installed where this checkpoint is loaded")
        return None

sys.meta_path.insert(0, BlockHfGlu())
"""

# Run in a fresh interpreter that cannot import hf_glu, as a user without it would load the folder: the config
# and every model class its auto_map names come from the folder's own code, each model class is built on the
# meta device (no memory), and the parameter shapes of the architecture's class are printed as JSON.
_LOAD_CHECK = (
    BLOCK_HF_GLU
    + r"""
import json

try:
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
except Exception as e:
    print(json.dumps([{"error": f"{type(e).__name__}: {e}"}] * (len(sys.argv) - 1)))
    raise SystemExit(0)


def load(folder):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    classes = {}
    for auto, reference in (getattr(config, "auto_map", None) or {}).items():
        if auto != "AutoConfig":
            classes[auto] = get_class_from_dynamic_module(reference, folder)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    named = [c for c in classes.values() if c.__name__ == architecture]
    if not named and hasattr(transformers, str(architecture)):
        named = [getattr(transformers, architecture)]
    shapes, prefix = {}, ""
    for cls in {*classes.values(), *named}:
        with torch.device("meta"):
            model = cls(config)
        if cls in named:
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            prefix = model.base_model_prefix
    return {"shapes": shapes, "prefix": prefix}


results = []
for folder in sys.argv[1:]:  # several folders share one interpreter's imports (seconds each)
    try:
        results.append(load(folder))
    except Exception as e:
        results.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(results))
"""
)
_LOAD_CHECK_TIMEOUT = 600  # seconds: importing torch and transformers on a busy machine


class CheckpointFolderError(ValueError):
    """A folder that would not load from the Hub; the message lists what is missing and what is expected."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFolderError(f"{path} is not readable JSON ({e}); expected a JSON object") from e
    if not isinstance(data, dict):
        raise CheckpointFolderError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def _weight_problems(folder: Path) -> list[str]:
    """What keeps the folder's weights from loading: none at all, an index naming missing files or names that
    are not plain file names, or a safetensors file whose header does not match its size (a truncated upload).
    The files checked are those Transformers loads (a single ``model.safetensors`` before an index)."""
    from .convert.errors import ConversionError
    from .convert.safetensors_io import read_header
    from .convert.source_files import WEIGHT_FILES, weight_files

    try:
        weights = weight_files(folder)
    except ConversionError as e:
        return [str(e)]
    if weights is None:
        return [f"no weights: expected one of {', '.join(WEIGHT_FILES)} (an index with the shards it names)"]
    problems = []
    for path in weights.files:
        if path.suffix == ".safetensors":
            try:
                read_header(path)
            except (OSError, ValueError) as e:
                problems.append(f"weight file {path.name!r} is corrupt ({e})")
        elif not zipfile.is_zipfile(path):
            problems.append(f"weight file {path.name!r} is not a PyTorch zip archive (truncated or not a checkpoint)")
    return problems


def _config_problems(folder: Path) -> list[str]:
    """A config whose model type Transformers does not know needs an auto_map naming its code."""
    path = folder / "config.json"
    if not path.is_file():
        return ["no config.json: expected the model's config, as written by save_pretrained"]
    config = _read_json(path)
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES or "AutoConfig" in (config.get("auto_map") or {}):
        return []
    return [
        f"config.json has model_type={model_type!r}, which Transformers does not know, and no auto_map: users "
        "without hf-glu could not load it; save it with save_pretrained after `import hf_glu`"
    ]


def _auto_map_modules(auto_map: dict) -> set[str]:
    """The module files an ``auto_map`` names (``"modeling_glu.GluModel"`` → ``modeling_glu.py``); every
    reference is a local ``module.Class`` by now (:func:`~hf_glu.convert.source_files.auto_map_problems`).
    Tokenizer entries are ``[slow, fast]`` lists that may hold ``None``."""
    references = []
    for value in auto_map.values():
        references.extend(value if isinstance(value, list) else [value])
    return {ref.rsplit(".", 1)[0] + ".py" for ref in references if isinstance(ref, str)}


def _relative_imports(code_file: Path) -> set[str]:
    """Module files that ``from .x import y`` statements in ``code_file`` need beside it."""
    try:
        tree = ast.parse(code_file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise CheckpointFolderError(f"code file {code_file} does not parse ({e}); expected valid Python") from e
    return {
        node.module.replace(".", "/") + ".py"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def _code_problems(folder: Path) -> list[str]:
    from .convert.source_files import AUTO_MAP_FILES, auto_map_problems

    problems = auto_map_problems(folder)  # another repository's code, or a path: never looked up
    if problems:
        return problems
    needed: dict[str, str] = {}  # code file -> who needs it, for the message
    for name in AUTO_MAP_FILES:
        if (folder / name).is_file():
            auto_map = _read_json(folder / name).get("auto_map") or {}
            needed.update({module: f"the auto_map of {name}" for module in _auto_map_modules(auto_map)})
    # Follow the code's own relative imports: transformers fetches those files too at load time.
    pending = [module for module in needed if (folder / module).is_file()]
    while pending:
        module = pending.pop()
        for imported in _relative_imports(folder / module):
            if imported not in needed:
                needed[imported] = f"an import in {module}"
                if (folder / imported).is_file():
                    pending.append(imported)
    missing = [(module, who) for module, who in sorted(needed.items()) if not (folder / module).is_file()]
    return [f"code file {module!r} named by {who} is missing" for module, who in missing]


def _load_problems(folders: list[Path]) -> list[list[str]]:
    """Load each folder as a user without hf-glu would (:data:`_LOAD_CHECK`, in one subprocess) and compare the
    weights' shapes with the model its config and code build; the problems of each folder, in order."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_CHECK, *map(str, folders)],
            capture_output=True,
            text=True,
            timeout=_LOAD_CHECK_TIMEOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},  # the folder alone: nothing fetched
        )
    except subprocess.TimeoutExpired:
        return [[f"loading it in a fresh process took over {_LOAD_CHECK_TIMEOUT} s"]] * len(folders)
    try:
        results = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):  # the process died before its answer (a crash in the code)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [[f"loading it in a fresh process ended with exit status {done.returncode} ({last})"]] * len(folders)
    return [_shape_problems(folder, result) for folder, result in zip(folders, results, strict=True)]


def _shape_problems(folder: Path, result: dict) -> list[str]:
    from .convert.safetensors_io import read_header

    if "error" in result:
        return [f"its config and code do not load without hf-glu ({result['error']})"]
    shapes, prefix = result["shapes"], result["prefix"]
    problems = []
    for path in sorted(folder.glob("*.safetensors")):
        for entry in read_header(path) or []:
            name = next((n for n in (entry.name, f"{prefix}.{entry.name}", entry.name.removeprefix(f"{prefix}."))
                         if n in shapes), None)  # fmt: skip
            if name is not None and list(entry.shape) != shapes[name]:
                problems.append(
                    f"weight {entry.name!r} in {path.name} has shape {list(entry.shape)}, but the folder's config "
                    f"and code build {shapes[name]}"
                )
    return problems[:5]


def check_checkpoint_folder(folder: str | Path) -> Path:
    """Raise :class:`CheckpointFolderError` unless ``folder`` holds a loadable checkpoint; returns it as a Path.

    Loadable means: every link in it leads inside it (or, for a Hub-cache snapshot, into its repository's
    blobs); ``config.json`` whose model type Transformers knows or whose ``auto_map`` names its code; weights
    (``model.safetensors``, a sharded index whose files all exist inside the folder, or ``pytorch_model.bin``)
    whose safetensors headers match their sizes; every ``auto_map`` entry (config and tokenizer) a
    ``module.Class`` of the folder's own code, present with the files its relative imports need; and then, in
    a process that cannot import hf_glu, the config and every class the ``auto_map`` names load from the
    folder's own code and build (on the meta device) a model whose parameter shapes are the weights'.
    """
    return check_checkpoint_folders([folder])[0]


def check_checkpoint_folders(folders: list[str | Path]) -> list[Path]:
    """:func:`check_checkpoint_folder` for several folders, loading them all in one subprocess; raises for the
    first folder that would not load."""
    return list(_checked_files([Path(folder) for folder in folders]))


def _checked_files(folders: list[Path]) -> dict[Path, list[Path]]:
    """Each folder's files (relative paths), every one of them checked; raises for the first folder that would
    not load."""
    from .convert.errors import ConversionError
    from .convert.source_files import check_folder_links

    for folder in folders:
        if not folder.is_dir():
            raise CheckpointFolderError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    files: dict[Path, list[Path]] = {}
    problems: dict[Path, list[str]] = {}
    for folder in folders:
        try:
            files[folder] = check_folder_links(folder)
        except ConversionError as e:  # a link leaving the folder: its content is not the checkpoint's
            problems[folder] = [str(e)]
            continue
        problems[folder] = _config_problems(folder) + _weight_problems(folder) + _code_problems(folder)
    complete = [f for f in folders if not problems[f]]  # every file is there: now see that it loads
    if complete:
        problems.update(zip(complete, _load_problems(complete), strict=True))
    for folder in folders:
        if problems[folder]:
            listed = "; ".join(problems[folder])
            raise CheckpointFolderError(f"refusing to push {str(folder)!r}, it would not load: {listed}")
    return files


def _exact_pattern(path: Path) -> str:
    """An ``allow_patterns`` entry matching exactly ``path`` (fnmatch's specials bracketed)."""
    return "".join(f"[{c}]" if c in "[*?" else c for c in path.as_posix())


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a checkpoint folder (weights, config, code files, tokenizer, model card) to the Hub repo
    ``repo_id``, creating the repo if needed; returns the repo's URL.

    The folder is checked first (:func:`check_checkpoint_folder`); a folder that would not load is
    refused with :class:`CheckpointFolderError` and nothing is uploaded. ``api`` defaults to ``HfApi()``.
    """
    folder = Path(folder)
    checked = _checked_files([folder])[folder]
    api = api if api is not None else HfApi()
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        commit_message=commit_message or f"Upload {folder.name} with hf-glu",
        allow_patterns=[_exact_pattern(path) for path in checked],  # what was checked, nothing added since
    )
    return str(repo_url)
