"""``python -m hf_glu.serve MODEL [options]``: Transformers' own ``transformers serve``, for GLU checkpoints.

Transformers 5.25's server builds a model with ``getattr(transformers, config.architectures[0])``, so a
class that is not part of Transformers (``GluForCausalLM``, ``GluGPTNeoXForCausalLM``…) fails to load there,
``--trust-remote-code`` or not ("module transformers has no attribute GluForCausalLM"). This wrapper runs the
same command line, options and server, with one change: while the server's model process loads a model,
the GLU classes are reachable under those names. They are this package's classes, so no remote code runs.

Every option is ``transformers serve``'s (``python -m hf_glu.serve --help``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import transformers
from transformers.cli.serving import model_manager

import hf_glu


@contextmanager
def glu_classes_in_transformers() -> Iterator[None]:
    """The GLU classes as attributes of ``transformers`` for the duration, where the server looks them up."""
    added = {name: cls for name, cls in hf_glu.glu_model_classes().items() if not hasattr(transformers, name)}
    for name, cls in added.items():
        setattr(transformers, name, cls)
    try:
        yield
    finally:
        for name in added:
            delattr(transformers, name)


class GluModelLoader(model_manager.ModelLoader):
    """The server's model loader, which also finds GLU classes. It travels to the model's process by pickle,
    which imports this module, and so hf_glu, there."""

    def load_model_and_processor(self, *args, **kwargs):
        with glu_classes_in_transformers():
            return super().load_model_and_processor(*args, **kwargs)


# What Transformers' server imports (its `serving` extra); `transformers[serving]` installs them all.
SERVING_PACKAGES = ("fastapi", "uvicorn", "pydantic", "openai")
SERVING_INSTALL = 'pip install "transformers[serving]"'
PROG = "python -m hf_glu.serve"


def missing_serving_packages() -> list[str]:
    """The packages of ``SERVING_PACKAGES`` that cannot be imported here."""
    missing = []
    for name in SERVING_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Runs ``transformers serve`` with ``argv`` (default: this process's arguments); returns the exit status.

    A missing server package is one line naming what to install (exit 2), not the ImportError's traceback."""
    import typer
    from transformers.cli.serve import Serve

    args = sys.argv[1:] if argv is None else argv
    help_only = any(arg in ("--help", "-h") for arg in args)
    if not help_only and (missing := missing_serving_packages()):
        print(f"{PROG}: error: serving needs {', '.join(missing)} (not installed); install with: {SERVING_INSTALL}",
              file=sys.stderr)  # fmt: skip
        return 2
    model_manager.ModelLoader = GluModelLoader  # what `Serve` builds its loader from, imported at call time
    # `Serve` as the only command: its usage line is then `python -m hf_glu.serve [OPTIONS] [FORCE_MODEL]` (through
    # Transformers' app it read `... serve [OPTIONS]`, and following it made "serve" the model).
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="serve")(Serve)
    try:
        app(args, prog_name=PROG)
    except SystemExit as done:  # typer ends by SystemExit, also on success
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
