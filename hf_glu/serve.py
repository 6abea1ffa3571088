"""``python -m hf_glu.serve MODEL [options]``: Transformers' own ``transformers serve``, for GLU checkpoints.

Transformers 5.25's server builds a model with ``getattr(transformers, config.architectures[0])``, so a
class that is not part of Transformers (``GluForCausalLM``, ``GluGPTNeoXForCausalLM``…) fails to load there,
``--trust-remote-code`` or not ("module transformers has no attribute GluForCausalLM"). This wrapper runs the
same command line, options and server, with one change: while the server's model process loads a model,
the GLU classes are reachable under those names. They are this package's classes, so no remote code runs.

Every option is ``transformers serve``'s (``python -m hf_glu.serve --help``).
"""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    """Runs ``transformers serve`` with ``argv`` (default: this process's arguments)."""
    from transformers.cli.transformers import app

    model_manager.ModelLoader = GluModelLoader  # what `Serve` builds its loader from, imported at call time
    app(["serve", *(sys.argv[1:] if argv is None else argv)], prog_name="python -m hf_glu.serve")


if __name__ == "__main__":
    main()
