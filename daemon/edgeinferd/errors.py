"""Typed errors of the data plane, free of any transport.

``STATUS_NAMES`` at the end is the one table from an error to its status,
named as gRPC names its codes; the gRPC adapter turns the names into codes
(``edgeinferd.protocol.status``) and metrics count by the same names, so no
part of the data plane needs grpc to be imported.
"""

from __future__ import annotations

from edgeinfer.tensors import TensorError


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


#: Every typed error's status, by gRPC code name; anything else is INTERNAL.
STATUS_NAMES: dict[type[Exception], str] = {
    InvalidInput: "INVALID_ARGUMENT",
    TensorError: "INVALID_ARGUMENT",
    ModelNotFound: "NOT_FOUND",
    ModelNotReady: "UNAVAILABLE",
    Overloaded: "RESOURCE_EXHAUSTED",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    Cancelled: "CANCELLED",
    PermissionDenied: "PERMISSION_DENIED",
    ModelExecutionError: "INTERNAL",
    # A model whose files are wrong cannot be loaded until someone fixes them.
    ConfigError: "FAILED_PRECONDITION",
}


def status_name(error: BaseException | None) -> str:
    """The status name of an outcome: OK, the table's name, or INTERNAL."""
    if error is None:
        return "OK"
    for kind in type(error).__mro__:
        name = STATUS_NAMES.get(kind)
        if name is not None:
            return name
    return "INTERNAL"
