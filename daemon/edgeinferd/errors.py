"""Typed errors of the data plane, free of any transport.

Each protocol adapter maps these to its status codes in one table
(``edgeinferd.protocol.status``); nothing else decides a status code.
"""

from __future__ import annotations


class EdgeInferError(Exception):
    """Base of every error a caller may see; the message is shown to them as is."""


class InvalidInput(EdgeInferError):
    """The request is malformed or does not match the model (a caller's mistake)."""


class ModelNotFound(EdgeInferError):
    """No such model (or version) in the repository."""


class ModelNotReady(EdgeInferError):
    """The model exists but is loading, failed or unloaded."""


class Overloaded(EdgeInferError):
    """A bounded queue or slot pool is full; the caller may retry later."""


class DeadlineExceeded(EdgeInferError):
    """The call's deadline passed before it could run."""


class Cancelled(EdgeInferError):
    """The call was cancelled by the caller or by shutdown."""


class PermissionDenied(EdgeInferError):
    """The operation is disabled by configuration for this caller."""


class ModelExecutionError(EdgeInferError):
    """The model's forward pass raised; the daemon's fault, not the caller's."""


class ConfigError(EdgeInferError):
    """A configuration file is invalid; the message names the file and field."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file = file
        self.field = field
        self.problem = problem
        where = f"{file}: {field}: " if field else f"{file}: "
        super().__init__(where + problem)
