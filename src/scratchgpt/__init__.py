"""scratchgpt: raw text to your own trained, evaluated, fine-tuned and served GPT."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input from the user: the CLI prints it as one line `error: ...` and exits non-zero."""
