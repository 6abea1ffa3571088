"""How every command line of hf_glu (``hf-glu`` and its demo, the fine-tuning recipes) answers bad input: one line
on stderr naming what is wrong and what is accepted, exit status 2, no traceback. A traceback means a bug."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_BAD_INPUT = 2
# What the library raises for bad input: ValueError (ConversionError is one), OSError (a missing file or folder).
BAD_INPUT = (OSError, ValueError)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (``hf-glu convert: error: argument --variant: invalid
    choice …``) instead of the usage block followed by the message; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())}\n")


class PositiveInt(argparse.Action):
    """``add_argument(FLAG, action=PositiveInt)``: an integer option (``type`` defaults to ``int``) refused below 1
    when parsed, as ``FLAG=VALUE is invalid; expected an integer >= 1``. An action, not a ``type``: argparse
    tells a type the value alone, and the message names the flag."""

    def __init__(self, *args, type: Callable[[str], int] = int, **kwargs) -> None:  # `type`: add_argument's keyword
        super().__init__(*args, type=type, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value, option_string=None):
        if value < 1:
            parser.error(f"{option_string}={value} is invalid; expected an integer >= 1")
        setattr(namespace, self.dest, value)


def refuse(prog: str, error: BaseException) -> int:
    """Print ``error`` as ``PROG: error: MESSAGE`` on one line of stderr; returns the exit status for bad input."""
    message = " ".join(str(error).split())  # one line, whatever the library's formatting
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_script(main: Callable[[], None]) -> int:
    """Run a script's ``main`` (a recipe's): 0 when it returns, :func:`refuse` (named after the script) when it
    raises bad input."""
    try:
        main()
    except BAD_INPUT as e:
        return refuse(Path(sys.argv[0]).name, e)
    return 0
