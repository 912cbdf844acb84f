"""Errors the core raises for a request it refuses (the transport maps each to a gRPC status),
and how caller text is quoted in them."""


class RequestError(Exception):
    """A request the server refuses; the message is shown to the caller as is."""


class InvalidRequest(RequestError):
    """Bad ids, shape or dtype: INVALID_ARGUMENT."""


class TableNotFound(RequestError):
    """No table by that name: NOT_FOUND."""


class KeyNotFound(RequestError):
    """A key a keyed table does not hold, under its `error` missing-key policy: NOT_FOUND."""


class OverLimit(RequestError):
    """Over a configured limit (ids per request, dense work, message size): RESOURCE_EXHAUSTED."""


class DeadlineExceeded(RequestError):
    """The caller's deadline passed before the work finished: DEADLINE_EXCEEDED."""


class Unauthenticated(RequestError):
    """No credential, or a wrong one: UNAUTHENTICATED."""


class PermissionDenied(RequestError):
    """A caller this RPC is not open to: PERMISSION_DENIED. `caller` says who it was
    (never a secret), for the audit log."""

    def __init__(self, message: str, caller: str = "") -> None:
        super().__init__(message)
        self.caller = caller


class Unavailable(RequestError):
    """Not now, here: another replica may serve it, or a retry may (UNAVAILABLE)."""


class FailedPrecondition(RequestError):
    """The server is not in a state to do this (e.g. updating rows shared by processes)."""


class AlreadyExists(RequestError):
    """A file the request would create is there already (and may not be replaced)."""


# At most this many characters of a caller's text go into a message or a log line.
QUOTE_CHARS = 100


def quoted(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` as a Python literal (control characters escaped), cut to its first `limit`
    characters: a caller's 1 MB name must not come back whole in its error, nor forge a
    line in a log."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
