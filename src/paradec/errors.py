"""User-facing errors.

Every error a user can cause (bad argument, bad model path, bad prompt) is a `ParadecError` whose message names
the offending value. The CLI turns it into one line on stderr and exit code 2; the server into a 4xx JSON body.
"""

from __future__ import annotations


class ParadecError(ValueError):
    """A problem with the user's input, explained in the message (never a bug in paradec)."""
