"""The engine's one error type (no HTTP here: the app maps `kind` to a status code)."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refuses; `kind` is one of invalid_request, not_found, queue_full, timeout, unavailable."""

    def __init__(self, message: str, kind: str = "invalid_request", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.kind, self.param, self.code = message, kind, param, code
