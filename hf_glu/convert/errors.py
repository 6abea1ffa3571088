"""The one error type conversion raises for bad input: the CLI prints it as a single line, no traceback."""


class ConversionError(ValueError):
    """A source, option or file that cannot be converted; the message names it and what is accepted."""
