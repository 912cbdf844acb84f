"""The authenticator's decisions and messages, one at a time.

tests/test_security.py attacks the server through real connections (tokens, mutual TLS,
loopback, admin off); this file pins what those calls cannot show one by one: how a
header is read, what each refusal says and records for the audit log, the defaults.
Written against mutation testing's survivors (`make mutate MODULE=auth`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from embedding_server.errors import PermissionDenied, Unauthenticated
from embedding_server.transport.auth import (
    ANONYMOUS,
    Authenticator,
    _bearer,
    _match,
)

from .conftest import exactly


@dataclass
class Call:
    """What the authenticator reads of a call: its peer, metadata and TLS names (grpc's
    ServicerContext gives these three; the rest of it is not consulted)."""

    peer_address: str = "ipv4:10.1.2.3:5000"
    metadata: Sequence[tuple[str, str | bytes]] = ()
    names: dict[str, list[bytes]] = field(default_factory=dict)

    def peer(self) -> str:
        return self.peer_address

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.names


ADMIN_OFF = (
    "admin RPCs are off on this server: start it with an admin token "
    "(--admin-tokens-file or EMBEDDING_ADMIN_TOKENS) or, with mutual TLS, "
    "--admin-client-names; for development on one machine, --allow-loopback-admin true"
)


def test_bearer_reads_the_token_of_any_case_of_the_scheme_from_str_or_bytes() -> None:
    assert _bearer([]) == b""
    assert _bearer([("other", "Bearer x")]) == b""
    assert _bearer([("authorization", "Basic x")]) == b""
    assert _bearer([("authorization", "Bearer tok")]) == b"tok"
    assert _bearer([("authorization", b"bearer tok")]) == b"tok"
    assert _bearer([("authorization", "  BEARER  tok  ")]) == b"tok"
    assert _bearer([("authorization", b"Bearer \xfftok")]) == "\ufffdtok".encode()


def test_match_gives_the_tokens_position_or_zero() -> None:
    tokens = [b"one", b"two"]
    assert _match(b"two", tokens) == 2 and _match(b"one", tokens) == 1
    assert repr(_match(b"three", tokens)) == "0"
    assert repr(_match(b"", [b""])) == "0"  # an empty credential never matches


def test_an_authenticator_by_default_checks_nobody_and_has_no_admin() -> None:
    auth = Authenticator()
    assert not auth.enabled and not auth.admin_enabled and not auth.mutual_tls
    assert auth.check(Call(), admin=False) == ANONYMOUS
    with pytest.raises(PermissionDenied, match=exactly(ADMIN_OFF)) as refused:
        auth.check(Call(), admin=True)
    assert refused.value.caller == ANONYMOUS
    assert Authenticator(loopback_admin=True).admin_enabled
    assert Authenticator(admin_names=["ops"]).admin_enabled
    assert Authenticator(mutual_tls=True).enabled and not Authenticator(["", ""]).enabled


def test_tokens_name_the_role_and_refusals_say_what_to_send() -> None:
    auth = Authenticator(["data-1", "data-2"], ["admin-1"])
    call = Call(metadata=[("authorization", "Bearer data-2")])
    assert auth.check(call, admin=False) == "data token #2"
    admin = Call(metadata=[("authorization", "Bearer admin-1")])
    assert auth.check(admin, admin=True) == auth.check(admin, admin=False) == "admin token #1"
    message = (
        "the credential of this call (data token #2) has the data role; admin RPCs need an "
        "admin token or an admin client certificate"
    )
    with pytest.raises(PermissionDenied, match=exactly(message)) as refused:
        auth.check(call, admin=True)
    assert refused.value.caller == "data token #2"
    missing = (
        "missing or invalid credential: every call here needs a data or an admin token; "
        "send metadata 'authorization: Bearer <token>' (embedding-client: EMBEDDING_TOKEN or "
        "--token)"
    )
    with pytest.raises(Unauthenticated, match=exactly(missing)):
        auth.check(Call(metadata=[("authorization", "Bearer nope")]), admin=False)
    with pytest.raises(Unauthenticated, match=exactly(missing)):
        auth.check_arrival([])
    admin_only = Authenticator(admin_tokens=["admin-1"])
    missing = (
        "missing or invalid credential: every call here needs an admin token: this server "
        "has no data tokens, its admin tokens serve data calls too; send metadata "
        "'authorization: Bearer <token>' (embedding-client: EMBEDDING_TOKEN or --token)"
    )
    with pytest.raises(Unauthenticated, match=exactly(missing)):
        admin_only.check(Call(), admin=False)
    with pytest.raises(Unauthenticated, match=exactly(missing)):
        admin_only.check_arrival([("authorization", "Bearer data-1")])


def test_loopback_admin_admits_only_loopback_callers_and_says_so() -> None:
    auth = Authenticator(["data"], loopback_admin=True)
    local = Call("ipv4:127.0.0.1:9", [("authorization", "Bearer data")])
    assert auth.check(local, admin=True) == "data token #1 (loopback, --allow-loopback-admin)"
    remote = Call(metadata=[("authorization", "Bearer data")])
    with pytest.raises(PermissionDenied, match="has the data role"):
        auth.check(remote, admin=True)


def test_client_certificates_carry_a_role_by_name() -> None:
    auth = Authenticator(mutual_tls=True, admin_names=["ops"])
    names = {"x509_common_name": [b"alice"], "x509_subject_alternative_name": [b"ops"]}
    # The admin name wins wherever it is among the certificate's names.
    assert auth.check(Call(names=names), admin=True) == "admin client certificate 'ops'"
    # Data calls are not told apart (the handshake checked the certificate); an admin call
    # of a certificate without an admin name is refused, naming it.
    alice = Call(names={"x509_common_name": [b"alice", b"ops-not"]})
    assert auth.check(alice, admin=False) == ANONYMOUS
    with pytest.raises(PermissionDenied, match=r"\(client certificate 'alice'\) has the data"):
        auth.check(alice, admin=True)
    # A name that is not UTF-8 is shown replaced, and never matches a configured one.
    for admin_names in (["ops"], ["\ufffdbob"]):
        odd = Call(names={"x509_common_name": [b"\xffbob"]})
        with pytest.raises(PermissionDenied) as refused:
            Authenticator(mutual_tls=True, admin_names=admin_names).check(odd, admin=True)
        assert refused.value.caller == "client certificate '\ufffdbob'"
    odd_admin = Authenticator(mutual_tls=True, admin_names=["ops"], loopback_admin=True)
    local = Call("unix:/s", names={"x509_common_name": [b"\xffops"]})
    assert odd_admin.check(local, admin=True) == (
        "client certificate '\ufffdops' (loopback, --allow-loopback-admin)"
    )
    # No certificate names (the handshake did not verify one): anonymous, data role.
    assert auth.check(Call(), admin=False) == ANONYMOUS
    with pytest.raises(PermissionDenied, match=r"\(anonymous\) has the data role"):
        auth.check(Call(), admin=True)
    only = Call(names={"x509_common_name": [b"ops"]})
    assert auth.check(only, admin=True) == "admin client certificate 'ops'"


def test_certificate_names_count_only_with_mutual_tls() -> None:
    # Without mutual TLS nothing verified the names: an admin name among them is no role.
    auth = Authenticator(["data"], admin_names=["ops"])
    call = Call(metadata=[("authorization", "Bearer data")], names={"x509_common_name": [b"ops"]})
    with pytest.raises(PermissionDenied, match=r"\(data token #1\) has the data role"):
        auth.check(call, admin=True)
