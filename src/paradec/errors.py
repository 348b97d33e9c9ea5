"""User-facing errors.

Every error a user can cause (bad argument, bad model path, bad prompt) is a `ParadecError` whose message names
the offending value. The CLI turns it into one line on stderr and exit code 2; the server into a 4xx JSON body whose
`param` is the error's `param`: the name of the request parameter at fault ("prompt", "method_options", "seed",
...), None where no single parameter is. A user's value is echoed through `shown`, so a huge value (a megabyte of
prompt, a list of 20,000 stop strings) never makes a huge message.
"""

from __future__ import annotations

import reprlib
from typing import Any

SHOWN_CHARS = 200  # the most characters of a user's value an error message repeats

_REPR = reprlib.Repr()  # bounded work too: a long string or list is cut while it is written, not after
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 32


class ParadecError(ValueError):
    """A problem with the user's input, explained in the message (never a bug in paradec)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def shown(value: Any) -> str:
    """`repr(value)`, cut to SHOWN_CHARS characters with a closing "…" when longer."""
    text = repr(value[: SHOWN_CHARS + 1]) if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"
