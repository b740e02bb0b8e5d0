"""User-facing errors."""


class PromptTuneError(Exception):
    """A user-facing error: one line naming the file, row or field and what was expected.

    The CLI prints these without a traceback; anything else escaping is a bug in prompttune.
    """
