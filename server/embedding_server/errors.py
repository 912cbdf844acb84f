"""Errors the core raises for a request it refuses; the transport maps each to a gRPC status."""


class RequestError(Exception):
    """A request the server refuses; the message is shown to the caller as is."""


class InvalidRequest(RequestError):
    """Bad ids, shape or dtype: INVALID_ARGUMENT."""


class TableNotFound(RequestError):
    """No table by that name: NOT_FOUND."""


class OverLimit(RequestError):
    """Over a configured limit (ids per request, dense work, message size): RESOURCE_EXHAUSTED."""


class DeadlineExceeded(RequestError):
    """The caller's deadline passed before the work finished: DEADLINE_EXCEEDED."""


class Unauthenticated(RequestError):
    """No credential, or a wrong one: UNAUTHENTICATED."""


class PermissionDenied(RequestError):
    """A caller this RPC is not open to: PERMISSION_DENIED."""


class FailedPrecondition(RequestError):
    """The server is not in a state to do this (e.g. updating rows shared by processes)."""
