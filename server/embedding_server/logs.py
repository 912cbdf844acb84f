"""Log lines that caller text cannot forge, and the audit line of every admin call.

Every message goes out with its control characters escaped (a newline in a caller's
path cannot start a fake line); tracebacks, which are ours, keep their lines. Admin
calls are logged at INFO on `embedding_server.audit` with who called, from where, what
they asked and how it ended, refused calls included.
"""

from __future__ import annotations

import logging
from typing import Any

from embedding_server.errors import QUOTE_CHARS, quoted

AUDIT = logging.getLogger("embedding_server.audit")

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators, each as
# its Python escape: what a terminal or a log shipper could take for a line break.
_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}
# Longest outcome message kept in an audit line.
DETAILS_CHARS = 300


def escape_controls(text: str) -> str:
    """`text` with every control character written as its escape (\\n -> \\x0a)."""
    return text.translate(_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages cannot hold control characters (see `escape_controls`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Log to stderr at `level`, every line through `EscapingFormatter`."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(EscapingFormatter(fmt))


def describe_request(request: Any) -> str:
    """A protobuf request's set fields for a log line: strings quoted in part, bytes by
    their length, numbers and flags as they are."""
    if request is None:
        return "(refused before its request was read)"
    if not hasattr(request, "ListFields"):
        return "(a request that did not parse)"
    parts = []
    for descriptor, value in request.ListFields():
        if isinstance(value, str):
            shown = quoted(value, QUOTE_CHARS)
        elif isinstance(value, bytes):
            shown = f"<{len(value)} bytes>"
        else:
            shown = str(value)[:QUOTE_CHARS]
        parts.append(f"{descriptor.name}={shown}")
    return " ".join(parts) or "(all fields empty)"


def audit_admin_call(
    method: str, who: str, peer: str, request: Any, code: str, details: str, seconds: float
) -> None:
    """The audit line of one admin call, refused or not."""
    outcome = code if not details else f"{code}: {details[:DETAILS_CHARS]}"
    AUDIT.info("admin %s by %s from %s [%s] -> %s (%.3f s)", method, who, peer,
               describe_request(request), outcome, seconds)  # fmt: skip
