"""The one exception type users see.

Library code raises `LmstackError` for anything a user can cause (a missing file, a bad key,
a checkpoint from another config). The CLI prints its message as one line and exits with code 2;
library callers catch it like any exception. The message names the problem and the fix.
"""


class LmstackError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise `LmstackError(message)` unless `condition` holds."""
    if not condition:
        raise LmstackError(message)
