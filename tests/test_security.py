"""Who may call: TLS, mutual TLS, bearer tokens, admin policy, reflection switch."""

from __future__ import annotations

import contextlib
import logging
import re
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from embedding_client import EmbeddingClient, EmbeddingError, Security
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server.config import ServerConfig
from embedding_server.transport.auth import is_loopback_peer

from .certs import issue, make_ca
from .conftest import ServerFactory, random_table

TOKENS = ("s3cret-token-alpha", "s3cret-token-beta")
TABLE = random_table(50, 6, seed=3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_ca(folder)
    other, other_cert, other_key = make_ca(folder, "other-ca")
    return SimpleNamespace(
        ca=ca,
        other_ca=other,
        server=issue(folder, "server", ca_cert, ca_key, server=True),
        client=issue(folder, "client", ca_cert, ca_key, server=False),
        operator=issue(folder, "operator", ca_cert, ca_key, server=False),
        stranger=issue(folder, "stranger", other_cert, other_key, server=False),
    )


def _client(port: int, **security: object) -> EmbeddingClient:
    return EmbeddingClient(
        f"localhost:{port}", timeout=5, max_attempts=1, security=Security.from_files(**security)
    )


def _code(port: int, **security: object) -> grpc.StatusCode | None:
    with _client(port, **security) as client:
        try:
            client.lookup([1, 2])
        except EmbeddingError as exc:
            return exc.code
    return None


def test_tls_serves_trusting_clients_only(
    start_server: ServerFactory, pki: SimpleNamespace
) -> None:
    server = start_server({"t": TABLE}, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    with _client(server.port, ca=str(pki.ca.cert)) as client:
        np.testing.assert_array_equal(client.lookup([1, 2]), TABLE[[1, 2]])
        assert client.health() == "SERVING"
    assert _code(server.port) == grpc.StatusCode.UNAVAILABLE  # plaintext: no handshake
    with _client(server.port) as plaintext, pytest.raises(EmbeddingError) as refused:
        plaintext.tables()
    assert "if it uses TLS, connect with TLS" in refused.value.details  # not just "Socket closed"
    assert _code(server.port, ca=str(pki.other_ca.cert)) == grpc.StatusCode.UNAVAILABLE
    # The certificate names localhost and 127.0.0.1; a client checking another name gets
    # a hint naming server_name.
    wrong = Security.from_files(ca=str(pki.ca.cert), server_name="db.example")
    with (
        EmbeddingClient(
            f"localhost:{server.port}", timeout=5, max_attempts=1, security=wrong
        ) as other,
        pytest.raises(EmbeddingError) as refused,
    ):
        other.tables()
    assert refused.value.details.endswith(
        "(the server's certificate does not name the host in the target: connect with the "
        "name it holds: Security(server_name=...); embedding-client --server-name)"
    ), refused.value.details


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    start_server: ServerFactory, pki: SimpleNamespace
) -> None:
    server = start_server(
        {"t": TABLE},
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.cert),
    )
    ca = str(pki.ca.cert)
    assert _code(server.port, ca=ca, cert=str(pki.client.cert), key=str(pki.client.key)) is None
    assert _code(server.port, ca=ca) == grpc.StatusCode.UNAVAILABLE  # refused at the handshake
    with _client(server.port, ca=ca) as no_certificate, pytest.raises(EmbeddingError) as refused:
        no_certificate.tables()
    assert refused.value.details.endswith(
        "(the server ended the TLS handshake: if it requires client certificates (mutual "
        "TLS), give one: Security(client_certificate=..., client_key=...); embedding-client "
        "--tls-cert and --tls-key)"
    ), refused.value.details
    stranger = {"cert": str(pki.stranger.cert), "key": str(pki.stranger.key)}
    assert _code(server.port, ca=ca, **stranger) == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens_guard_every_rpc_but_health(start_server: ServerFactory) -> None:
    server = start_server({"t": TABLE}, auth_tokens=TOKENS)
    with _client(server.port) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        for call in (
            lambda: anonymous.lookup([1]),
            lambda: anonymous.lookup_dense([1]),
            anonymous.tables,
            lambda: anonymous.reload_table("t"),
        ):
            with pytest.raises(EmbeddingError) as raised:
                call()
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer <token>" in raised.value.details
    with (
        _client(server.port, token="s3cret-token-wrong") as wrong,
        pytest.raises(EmbeddingError) as raised,
    ):
        wrong.lookup([1])
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    for token in TOKENS:
        with _client(server.port, token=token) as client:
            np.testing.assert_array_equal(client.lookup([3]), TABLE[[3]])
            with pytest.raises(EmbeddingError) as raised:
                client.reload_table("t")  # a data token: no admin
            assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "admin RPCs are off on this server" in raised.value.details
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as raised_rpc,
    ):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert raised_rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # health's Watch (a server stream, as Kubernetes' grpc probes may use) is open too
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_tokens_never_reach_logs_or_metrics(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server({"t": TABLE}, auth_tokens=TOKENS)
    for token in (*TOKENS, "s3cret-token-wrong"):
        with _client(server.port, token=token) as client, contextlib.suppress(EmbeddingError):
            client.lookup([1])
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        exposition = response.read().decode()
    described = "\n".join(ServerConfig(auth_tokens=TOKENS).describe())
    for text in (caplog.text, exposition, described):
        assert "s3cret" not in text
    assert "auth_tokens = (2 tokens)" in described


def test_reflection_can_be_turned_off(start_server: ServerFactory) -> None:
    server = start_server({"t": TABLE}, reflection=False)
    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _admin_code(target: str, **security: object) -> str:
    """The status code of an admin call (a reload of a table with no file: past the
    credential check it is INVALID_ARGUMENT)."""
    with EmbeddingClient(
        target, timeout=5, max_attempts=1, security=Security.from_files(**security)
    ) as client:
        try:
            client.reload_table("t")
        except EmbeddingError as exc:
            return exc.code.name
    return "OK"


ADMITTED = "INVALID_ARGUMENT"  # the reload itself fails: the call got past the credentials


def test_admin_is_off_by_default_even_from_loopback(start_server: ServerFactory) -> None:
    server = start_server({"t": TABLE}, host="localhost")
    for host in ("localhost", "127.0.0.1", "[::1]"):
        assert _admin_code(f"{host}:{server.port}") == "PERMISSION_DENIED", host
    with _client(server.port) as client:  # data calls stay open
        np.testing.assert_array_equal(client.lookup([1]), TABLE[[1]])


def test_loopback_admin_works_over_every_loopback_address(start_server: ServerFactory) -> None:
    """grpc writes an IPv6 peer as ipv6:%5B::1%5D:PORT: every loopback spelling, through
    real connections (localhost resolves to ::1 first here)."""
    server = start_server({"t": TABLE}, host="localhost", allow_loopback_admin=True)
    for host in ("localhost", "127.0.0.1", "[::1]"):
        assert _admin_code(f"{host}:{server.port}") == ADMITTED, host


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5555", True),
        ("ipv4:127.8.9.10:5555", True),
        ("ipv6:[::1]:5555", True),
        ("ipv6:%5B::1%5D:5555", True),
        ("ipv6:%5B::ffff:127.0.0.1%5D:5555", True),
        ("unix:/run/embedding.sock", True),
        ("unix-abstract:embedding", True),
        ("ipv4:10.1.2.3:5555", False),
        ("ipv6:[fe80::1%eth0]:5555", False),
        ("ipv4:not-an-address:5555", False),
        ("vsock:3:5555", False),
        ("ipv6:%5B2001:db8::1%5D:5555", False),
        ("ipv6:%5B::ffff:10.0.0.1%5D:5555", False),
        ("ipv4:127.0.0.1.evil.example:5555", False),
        ("dns:localhost:5555", False),
        ("", False),
    ],
)
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_admin_and_data_tokens_have_their_roles(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedding_server.audit")
    server = start_server(
        {"t": TABLE}, auth_tokens=("data-token",), admin_tokens=("admin-token",),
        allow_loopback_admin=True,
    )  # fmt: skip
    target = f"127.0.0.1:{server.port}"
    assert _admin_code(target) == "UNAUTHENTICATED"  # loopback admin still needs a token
    assert _admin_code(target, token="data-token") == ADMITTED  # loopback: allowed as said
    remote_like = start_server({"t": TABLE}, auth_tokens=("data-token",),
                               admin_tokens=("admin-token",))  # fmt: skip
    target = f"127.0.0.1:{remote_like.port}"
    assert _admin_code(target, token="data-token") == "PERMISSION_DENIED"
    assert _admin_code(target, token="admin-token") == ADMITTED
    assert _admin_code(target, token="admin-tokeN") == "UNAUTHENTICATED"
    for scheme in ("Bearer", "bearer", "BEARER"):
        metadata = (("authorization", f"{scheme} admin-token"),)
        with (
            grpc.insecure_channel(target) as channel,
            pytest.raises(grpc.RpcError) as raised,
        ):
            pb_grpc.EmbeddingAdminStub(channel).ReloadTable(
                pb.ReloadTableRequest(table="t"), metadata=metadata, timeout=5
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, scheme
    with _client(remote_like.port, token="admin-token") as admin:  # admin works for data
        np.testing.assert_array_equal(admin.lookup([2]), TABLE[[2]])
        admin.update_rows([4], TABLE[[4]], "t")  # an admin call that succeeds
    audit = [r.getMessage() for r in caplog.records if r.name == "embedding_server.audit"]
    assert len(audit) == 9, audit  # every admin call, refused or not; no data call
    assert re.fullmatch(
        r"admin UpdateRows by admin token #1 from ipv4:127\.0\.0\.1:\d+ \[[^]]*\] -> OK "
        r"\(\d+\.\d{3} s\)",
        audit[-1],
    ), audit[-1]
    assert any(
        "admin ReloadTable by data token #1 from ipv4:127.0.0.1:" in line
        and "[table='t'] -> PERMISSION_DENIED: the credential of this call" in line
        for line in audit
    ), audit
    assert any("by admin token #1 from" in line and "-> INVALID_ARGUMENT" in line for line in audit)
    assert any("by a caller without a valid credential" in line for line in audit)
    assert not any("admin-token" in line or "data-token" in line for line in audit)


def test_mutual_tls_admin_by_client_certificate_name(
    start_server: ServerFactory, pki: SimpleNamespace
) -> None:
    server = start_server(
        {"t": TABLE},
        host="localhost",
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.cert),
        admin_client_names=("operator",),
    )
    target = f"localhost:{server.port}"
    client = {"ca": str(pki.ca.cert), "cert": str(pki.client.cert), "key": str(pki.client.key)}
    operator = {**client, "cert": str(pki.operator.cert), "key": str(pki.operator.key)}
    assert _admin_code(target, **client) == "PERMISSION_DENIED"  # CN=client: data only
    assert _admin_code(target, **operator) == ADMITTED
    assert _code(server.port, **client) is None  # data calls for any certificate of the CA


def test_tokens_file_and_env(tmp_path: Path) -> None:
    from embedding_server.config import load_config

    (tmp_path / "tokens").write_text("# comment\nfrom-file\n\n")
    config = load_config(
        ["--auth-tokens-file", str(tmp_path / "tokens")], env={"EMBEDDING_AUTH_TOKENS": "a,b"}
    )
    assert config.auth_tokens == ("a", "b", "from-file")


def test_tls_to_a_plaintext_server_says_to_connect_without_it(
    start_server: ServerFactory, pki: SimpleNamespace
) -> None:
    server = start_server({"t": TABLE})
    with _client(server.port, ca=str(pki.ca.cert)) as tls, pytest.raises(EmbeddingError) as refused:
        tls.tables()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details.endswith(
        "(the server answered without TLS: connect without it (no Security(tls=...) or CA; "
        "embedding-client without --tls / --tls-ca))"
    ), refused.value.details


def test_a_server_with_admin_tokens_only_asks_every_call_for_one(
    start_server: ServerFactory,
) -> None:
    """No data tokens, an admin token: data calls need a credential too (the admin token
    serves them), and the refusal says so (issue 29: untested; issue 32: unexplained)."""
    server = start_server({"t": TABLE}, admin_tokens=("deployer",))
    with _client(server.port) as anonymous, pytest.raises(EmbeddingError) as refused:
        anonymous.lookup([1])
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "this server has no data tokens, its admin tokens serve data calls too" in (
        refused.value.details
    )
    with _client(server.port, token="deployer") as admin:
        np.testing.assert_array_equal(admin.lookup([1]), TABLE[[1]])
        assert admin.health() == "SERVING"
