"""One error base for every face: the service answers ``http_status`` with the message, a job fails
with the message as its reason, the CLI prints it without a traceback, the FiftyOne plugin shows it.

``kind`` is a short fixed name (a Prometheus label value, a key to branch on); the message is for
people and may change. Each subclass also keeps the built-in base it had (``ValueError`` for bad
input, ``RuntimeError`` for failures), so ``except ValueError`` in a user's script still works.
"""

from __future__ import annotations


class LabelloopError(Exception):
    """Base of labelloop's own errors. ``kind`` may be narrowed per instance (``MediaError(…, kind=…)``)."""

    kind = "error"
    http_status = 500

    def __init__(self, message: str = "", *, kind: str | None = None, http_status: int | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        if http_status is not None:
            self.http_status = http_status


def reason_of(exc: BaseException) -> str:
    """A job's failure reason: our own errors speak for themselves, anything else names its type."""
    if isinstance(exc, LabelloopError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
