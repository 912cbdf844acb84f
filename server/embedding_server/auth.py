"""Who may call: bearer tokens compared in constant time, and the admin policy.

Tokens never reach logs or metrics: errors name what is missing, never a value.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from embedding_server.errors import PermissionDenied, Unauthenticated

LOOPBACK_PEER_PREFIXES = ("ipv4:127.", "ipv6:[::1]", "unix:")


class Authenticator:
    """Checks the `authorization: Bearer <token>` metadata of a call.

    Parameters
    ----------
    tokens : accepted tokens; none turns token checks off.
    mutual_tls : clients are verified by certificate at the handshake (counts as auth on).
    """

    def __init__(self, tokens: Sequence[str] = (), mutual_tls: bool = False) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        self.mutual_tls = mutual_tls

    @property
    def enabled(self) -> bool:
        """Whether callers must prove who they are (tokens or client certificates)."""
        return bool(self._tokens) or self.mutual_tls

    def check(self, metadata: Sequence[tuple[str, str | bytes]], *, admin: bool, peer: str) -> None:
        """Raise Unauthenticated or PermissionDenied unless this call may proceed.

        With tokens configured every call needs one. With auth off entirely, admin calls
        are open to loopback peers only, so a reload cannot come from the network.
        """
        if self._tokens:
            if not self._valid(metadata):
                raise Unauthenticated(
                    "missing or invalid credential: send metadata 'authorization: Bearer <token>'"
                )
            return
        if admin and not self.enabled and not peer.startswith(LOOPBACK_PEER_PREFIXES):
            raise PermissionDenied(
                "admin RPCs from other hosts need auth: start the server with tokens or "
                "client certificates"
            )

    def _valid(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        presented = b""
        for key, value in metadata:
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, credential = text.partition(" ")
                if scheme.lower() == "bearer":
                    presented = credential.strip().encode()
        # Compare against every token, without stopping early, so the time taken
        # does not tell which token (or which prefix) matched.
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(presented, accepted)
        return matched and bool(presented)
