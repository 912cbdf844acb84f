"""Who may call what: two roles (data and admin), the credentials that carry them, and
loopback detection for the development-only unauthenticated admin.

A data credential (a data token, a client certificate from the mutual-TLS CA, or no
credential at all on a server with auth off) may look up, list tables and use
reflection. Admin RPCs need an admin credential (an admin token, or a client
certificate whose name is on the admin list); with none configured they are off unless
the operator allows unauthenticated admin from loopback. Tokens never reach logs or
metrics: errors name what is missing, never a value.
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

from embedding_server.errors import PermissionDenied, Unauthenticated


class CallContext(Protocol):
    """What the checks read of a call's context (grpc's sync and asyncio contexts alike)."""

    def peer(self) -> str: ...

    def invocation_metadata(self) -> Any: ...

    def auth_context(self) -> Any: ...


# What a caller presented, for the admin audit log.
ANONYMOUS = "anonymous"

# The auth context keys of a verified client certificate's names (grpc's ssl transport).
_CERTIFICATE_NAME_KEYS = ("x509_subject_alternative_name", "x509_common_name")


def is_loopback_peer(peer: str) -> bool:
    """Whether a grpc peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, grpc's
    percent-encoded `ipv6:%5B::1%5D:5000`, `unix:/path`) is this host."""
    kind, _, address = urllib.parse.unquote(peer).partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind == "ipv4":
        host = address.rpartition(":")[0]
    elif kind == "ipv6":
        host = address.rpartition(":")[0].strip("[]").partition("%")[0]  # drop a zone id
    else:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class Authenticator:
    """Checks who a call comes from and whether its role allows the RPC.

    Parameters
    ----------
    data_tokens, admin_tokens : bearer tokens of each role; with any configured, every
        call (health excepted) needs one. An admin token also works for data RPCs.
    mutual_tls : clients are verified by certificate at the handshake (counts as a data
        credential when no tokens are configured).
    admin_names : client certificate names (SAN or CN) that carry the admin role.
    loopback_admin : admin RPCs from loopback callers need no admin credential
        (development only).
    """

    def __init__(
        self,
        data_tokens: Sequence[str] = (),
        admin_tokens: Sequence[str] = (),
        *,
        mutual_tls: bool = False,
        admin_names: Sequence[str] = (),
        loopback_admin: bool = False,
    ) -> None:
        self._data = [t.encode() for t in data_tokens if t]
        self._admin = [t.encode() for t in admin_tokens if t]
        self.mutual_tls = mutual_tls
        self.admin_names = frozenset(n.encode() for n in admin_names if n)
        self.loopback_admin = loopback_admin
        # What a call without a valid token is told: what to send, and where a server
        # with admin tokens only surprises (its admin token is also the data credential).
        roles = ("a data or an admin token" if self._data
                 else "an admin token: this server has no data tokens, its admin tokens "
                 "serve data calls too")  # fmt: skip
        self.missing = (
            f"missing or invalid credential: every call here needs {roles}; send metadata "
            "'authorization: Bearer <token>' (embedding-client: EMBEDDING_TOKEN or --token)"
        )

    @property
    def enabled(self) -> bool:
        """Whether callers must prove who they are (tokens or client certificates)."""
        return bool(self._data or self._admin) or self.mutual_tls

    @property
    def admin_enabled(self) -> bool:
        """Whether any caller can reach admin RPCs at all."""
        return bool(self._admin or self.admin_names) or self.loopback_admin

    def check(self, context: CallContext, *, admin: bool) -> str:
        """Raise Unauthenticated or PermissionDenied unless this call may proceed; else
        say who the caller is (never a secret), for the audit log."""
        if not admin and not (self._data or self._admin):
            # The hot path: an open server's lookups, or mutual TLS (checked at the handshake).
            return ANONYMOUS
        who, is_admin = self._identify(context)
        if not admin or is_admin:
            return who
        if self.loopback_admin and is_loopback_peer(context.peer()):
            return f"{who} (loopback, --allow-loopback-admin)"
        if not self.admin_enabled:
            raise PermissionDenied(
                "admin RPCs are off on this server: start it with an admin token "
                "(--admin-tokens-file or EMBEDDING_ADMIN_TOKENS) or, with mutual TLS, "
                "--admin-client-names; for development on one machine, "
                "--allow-loopback-admin true",
                who,
            )
        raise PermissionDenied(
            f"the credential of this call ({who}) has the data role; admin RPCs need an "
            "admin token or an admin client certificate",
            who,
        )

    def check_arrival(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Raise Unauthenticated for a call that carries no valid token, from its headers
        alone, as it arrives: before it waits for its message or holds a place among the
        calls in flight. Only where tokens are the credential: with mutual TLS the
        handshake has checked the caller already (and a certificate may carry the role)."""
        if self.mutual_tls or not (self._data or self._admin):
            return
        presented = _bearer(metadata)
        if not (_match(presented, self._admin) or _match(presented, self._data)):
            raise Unauthenticated(self.missing)

    def _identify(self, context: CallContext) -> tuple[str, bool]:
        """(who, whether the role is admin), or Unauthenticated."""
        certificate = self._certificate_name(context) if self.mutual_tls else None
        if certificate is not None and certificate in self.admin_names:
            return f"admin client certificate {certificate.decode(errors='replace')!r}", True
        if self._data or self._admin:
            presented = _bearer(context.invocation_metadata() or ())
            admin = _match(presented, self._admin)
            if admin:
                return f"admin token #{admin}", True
            data = _match(presented, self._data)
            if data:
                return f"data token #{data}", False
            raise Unauthenticated(self.missing)
        if certificate is not None:
            return f"client certificate {certificate.decode(errors='replace')!r}", False
        return ANONYMOUS, False

    def _certificate_name(self, context: CallContext) -> bytes | None:
        """The verified client certificate's name on the admin list, else its first name."""
        auth: dict[str, Any] = dict(context.auth_context() or {})
        names = [n for key in _CERTIFICATE_NAME_KEYS for n in auth.get(key, ())]
        for name in names:
            if name in self.admin_names:
                return bytes(name)
        return bytes(names[0]) if names else None


def _bearer(metadata: Sequence[tuple[str, str | bytes]]) -> bytes:
    """The token of the `authorization: Bearer <token>` entry (any case of the scheme).
    More than one `authorization` entry is refused: which one counts would be a guess
    (proxies and servers differ), and a caller could slip a second one past a check of
    the first."""
    entries = [value for key, value in metadata if key == "authorization"]
    if len(entries) > 1:
        raise Unauthenticated(
            f"{len(entries)} 'authorization' metadata entries: send exactly one, "
            "'authorization: Bearer <token>'"
        )
    if not entries:
        return b""
    value = entries[0]
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    scheme, _, credential = text.strip().partition(" ")
    return credential.strip().encode() if scheme.lower() == "bearer" else b""


def _match(presented: bytes, accepted: Sequence[bytes]) -> int:
    """The 1-based position of `presented` among `accepted` (0: none). Every token is
    compared, without stopping early, so the time taken does not tell which (or which
    prefix) matched."""
    found = 0
    for number, token in enumerate(accepted, 1):
        if hmac.compare_digest(presented, token) and presented:
            found = number
    return found
