"""The console scripts as a user runs them: a real server process, the CLI, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_client.client import with_default_port

from .conftest import (
    BIN,
    WORKED_WEIGHTS,
    ServerFactory,
    free_port,
    random_table,
    server_env,
    wait_serving,
)


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**server_env(), **(env or {})},
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    wait_serving(target, process)
    return process, target


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("tables")
    np.save(folder / "worked.npy", WORKED_WEIGHTS)
    process, target = _start(["--table", f"worked={folder / 'worked.npy'}"])
    yield target, folder
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "embedding-client"), *args], capture_output=True, text=True, timeout=60,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip


def test_cli_lookup_both_paths(served: tuple[str, Path]) -> None:
    target, _ = served
    for extra in ([], ["--dense"]):
        done = _cli("--target", target, "lookup", "--ids", "0,2,1,2", "--json", *extra)
        assert done.returncode == 0, done.stderr
        payload = json.loads(done.stdout)
        assert payload["table"] == "worked"
        assert payload["shape"] == [4, 4]
        np.testing.assert_array_equal(
            np.asarray(payload["vectors"], dtype=np.float32), WORKED_WEIGHTS[[0, 2, 1, 2]]
        )
    done = _cli("--target", target, "lookup", "--ids", "0,2,1,2", "--shape", "2,2")
    assert done.returncode == 0
    assert done.stdout.startswith(
        "Lookup table=worked version=1 update_seq=0 shape=(2, 2, 4) dtype=float32"
    )
    assert "0.9" in done.stdout


def test_cli_pooled_lookup(served: tuple[str, Path]) -> None:
    target, _ = served
    w = WORKED_WEIGHTS
    for extra in ([], ["--dense"]):
        done = _cli("--target", target, "lookup", "--ids", "0,2,1,2", "--pool", "mean",
                    "--lengths", "2,2", "--json", *extra)  # fmt: skip
        assert done.returncode == 0, done.stderr
        vectors = np.asarray(json.loads(done.stdout)["vectors"], dtype=np.float32)
        np.testing.assert_allclose(vectors, [(w[0] + w[2]) / 2, (w[1] + w[2]) / 2], rtol=1e-6)
    done = _cli("--target", target, "lookup", "--ids", "0,2,1", "--pool", "sum", "--offsets",
                "0,1", "--weights", "2,1,0.5", "--padding-id", "2", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    vectors = np.asarray(json.loads(done.stdout)["vectors"], dtype=np.float32)
    np.testing.assert_allclose(vectors, [2 * w[0], 0.5 * w[1]], rtol=1e-6)
    done = _cli("--target", target, "lookup", "--ids", "0,2", "--lengths", "1,1")
    assert done.returncode == 2
    assert "--offsets, --lengths and --weights need --pool" in done.stderr


def test_cli_many_features(served: tuple[str, Path]) -> None:
    target, _ = served
    done = _cli("--target", target, "many", "--feature", "worked:0,2",
                "--feature", "again=worked:1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert list(payload) == ["worked", "again"]
    np.testing.assert_array_equal(
        np.asarray(payload["again"]["vectors"], dtype=np.float32), WORKED_WEIGHTS[[1]]
    )
    done = _cli("--target", target, "many", "--feature", "worked:0", "--feature", "x=nope:1")
    assert done.returncode == 1
    assert "feature 'x': unknown table 'nope'" in done.stderr


def test_cli_update_and_snapshot(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", WORKED_WEIGHTS)
    process, target = _start(
        ["--table", f"t={tmp_path / 't.npy'}", "--snapshot-dir", str(tmp_path)],
        env={"EMBEDDING_ADMIN_TOKENS": "admin-secret"},
    )
    admin = {"EMBEDDING_TOKEN": "admin-secret"}
    try:
        np.save(tmp_path / "rows.npy", np.full((2, 4), 7.0, np.float32))
        done = _cli("--target", target, "update", "--ids", "0,2", "--vectors",
                    str(tmp_path / "rows.npy"))  # fmt: skip
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr  # no token
        assert "its admin tokens serve data calls too" in done.stderr
        assert "(embedding-client: EMBEDDING_TOKEN or --token)" in done.stderr
        done = _cli("--target", target, "update", "--ids", "0,2", "--vectors",
                    str(tmp_path / "rows.npy"), env=admin)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "updated 2 rows of t: update_seq 1"
        done = _cli("--target", target, "snapshot", "--path", "snap.npy", env=admin)
        assert done.returncode == 0, done.stderr
        expected = WORKED_WEIGHTS.copy()
        expected[[0, 2]] = 7
        np.testing.assert_array_equal(np.load(tmp_path / "snap.npy"), expected)
        done = _cli("--target", target, "snapshot", "--path", "snap.npy", env=admin)
        assert done.returncode == 1 and "ALREADY_EXISTS" in done.stderr
        assert done.stderr.splitlines()[1] == "(pass --overwrite to replace it)"
        done = _cli("--target", target, "snapshot", "--path", "snap.npy", "--overwrite", env=admin)
        assert done.returncode == 0, done.stderr
        done = _cli("--target", target, "update", "--ids", "0", "--vectors", "/nope.npy")
        assert done.returncode == 2 and "cannot read /nope.npy" in done.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def test_cli_output_into_a_closed_pipe_is_quiet(served: tuple[str, Path]) -> None:
    target, _ = served
    client = BIN / "embedding-client"
    done = subprocess.run(
        # ~0.5 MB of JSON: far more than a pipe buffers, so the writer meets a closed pipe.
        f"'{client}' --target {target} lookup --json --ids {','.join(['0'] * 20000)} "
        "| head -c 100",
        shell=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.startswith('{"table": "worked"')
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_cli_tables_and_health(served: tuple[str, Path]) -> None:
    target, _ = served
    done = _cli("--target", target, "tables")
    assert done.returncode == 0
    header, row = done.stdout.splitlines()
    assert header.split() == [
        "name",
        "rows",
        "dim",
        "dtype",
        "device",
        "version",
        "update_seq",
        "bytes",
        "shard",
        "shard_rows",
        "keys",
        "missing",
        "log",
        "default",
    ]
    # `auto` puts the table on the GPU where there is one.
    device = "cuda:0" if _has_cuda() else "cpu"
    assert row.split() == ["worked", "3", "4", "float32", device, "1", "0", "48", "-", "-", "-",
                           "-", "no", "*"]  # fmt: skip
    done = _cli("--target", target, "tables", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{
        "name": "worked", "rows": 3, "dim": 4, "dtype": "float32", "device": device,
        "version": 1, "bytes": 48, "is_default": True, "shard": None, "shard_rows": None,
        "update_seq": 0, "update_log": False, "keys": None, "max_keys": None,
        "missing_keys": None, "bags_skip_missing": True,
    }]  # fmt: skip
    done = _cli("--target", target, "health")
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")


def test_cli_reports_errors_in_one_line(served: tuple[str, Path]) -> None:
    target, _ = served
    done = _cli("--target", target, "lookup", "--ids", "0,3")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: INVALID_ARGUMENT: id 3 at position 1 is out of range: "
        "table has 3 rows, ids must be in [0, 3)"
    )
    nobody = f"127.0.0.1:{free_port()}"
    done = _cli("--target", nobody, "--timeout", "2", "health")
    assert done.returncode == 1
    assert done.stderr.startswith("error: UNAVAILABLE")
    assert done.stderr.strip().endswith(
        f"(nothing listens at {nobody}: is the embedding-server running there?)"
    )
    assert len(done.stderr.strip().splitlines()) == 1
    # A typo in a list of ids is refused, not read as fewer ids.
    done = _cli("--target", target, "lookup", "--ids", "0,,1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].endswith(
        "expected comma-separated integers (int64): value 2 of '0,,1' is empty"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--table", "t=/nonexistent/t.npy"], "table 't': /nonexistent/t.npy: no such file"),
        (["--table", "t={folder}/bad.npy"], "is not a plain numeric .npy array"),
        (["--table", "t={folder}/inf.npy"], "row 1, column 0 holds inf; tables must be finite"),
        (["--table", "t={folder}/1d.npy"], "expected a 2-D [rows, dim] table"),
        (["--device", "cuda:99"], "--device cuda:99: CUDA is not available"),
        (
            ["--port", "{busy}"],
            "cannot bind gRPC to 127.0.0.1:{busy}: Address already in use "
            "(another server runs there? Pick another port: --port N, or with make run: "
            'make run ARGS="--port N")',
        ),
    ],
)
def test_startup_errors_stop_with_one_clear_line(
    served: tuple[str, Path], args: list[str], message: str
) -> None:
    target, folder = served
    (folder / "bad.npy").write_bytes(b"garbage")
    np.save(folder / "inf.npy", np.array([[1.0], [np.inf]], dtype=np.float32))
    np.save(folder / "1d.npy", np.zeros(3, dtype=np.float32))
    busy = target.rsplit(":", 1)[1]
    args = [a.format(folder=folder, busy=busy) for a in args]
    if "cuda" in message:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():  # a device that does not exist, then
            message = f"--device cuda:99: this machine has {torch.cuda.device_count()} CUDA"
    done = subprocess.run(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--metrics-port", "0",
         "--port", "0", *args],
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], done.stderr  # one error line, and it is the last
    assert errors[0].startswith("embedding-server: error: ")
    assert message.format(busy=busy) in errors[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_cli_health_exits_nonzero_unless_serving(start_server: ServerFactory) -> None:
    """The container's HEALTHCHECK runs `embedding-client health`: its exit status is
    the verdict, so NOT_SERVING (a draining server) must not exit 0."""
    server = start_server({"t": WORKED_WEIGHTS})
    target = f"127.0.0.1:{server.port}"
    serving = _cli("--target", target, "health")
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")
    server.not_serving()  # what a SIGTERM does first
    draining = _cli("--target", target, "health")
    assert (draining.returncode, draining.stdout.strip()) == (1, "NOT_SERVING")


def test_a_missing_table_file_is_reported_before_torch_loads() -> None:
    """Importing torch takes seconds; a typo in a path is said without it (here torch
    cannot be imported at all, so a server that reached it would say so instead)."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from embedding_server.__main__ import main\n"
        "sys.exit(main(['--table', 't=/nonexistent/t.npy', '--port', '0']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env=server_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "embedding-server: error: table 't': /nonexistent/t.npy: no such file"
    )


def test_sigterm_drains_in_flight_calls(tmp_path: Path) -> None:
    """Health goes NOT_SERVING first, a slow in-flight call completes, new calls are refused."""
    weights = random_table(20_000, 64, seed=11)
    np.save(tmp_path / "t.npy", weights)
    process, target = _start(
        [
            "--table",
            f"t={tmp_path / 't.npy'}",
            "--grace",
            "20",
            "--dense-chunk-cells",
            "20000",
            "--max-dense-macs",
            "100000000000",
        ]
    )
    statuses: list[str] = []
    channel = grpc.insecure_channel(target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

    def follow() -> None:
        try:
            for update in watch:
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(update.status))
        except grpc.RpcError:
            pass

    threading.Thread(target=follow, daemon=True).start()
    ids = np.random.default_rng(1).integers(0, 20_000, size=12_000)
    results: list[object] = []

    def slow_call() -> None:
        with EmbeddingClient(target, max_attempts=1, timeout=60) as client:
            try:
                results.append(client.lookup_dense(ids))
            except EmbeddingError as exc:
                results.append(exc)

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.5)  # the dense call is in flight
    assert caller.is_alive(), f"the dense call ended too fast to test draining: {results}"
    process.send_signal(signal.SIGTERM)
    caller.join(timeout=60)
    assert len(results) == 1 and isinstance(results[0], np.ndarray), results
    np.testing.assert_array_equal(results[0], weights[ids])

    with (
        EmbeddingClient(target, max_attempts=1, timeout=5) as client,
        pytest.raises(EmbeddingError) as raised,
    ):
        client.lookup([1])
    assert raised.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    watch.cancel()
    channel.close()
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert statuses[0] == "SERVING" and "NOT_SERVING" in statuses, statuses
    assert "received SIGTERM" in output and "stopped" in output


def test_tables_from_a_config_file(tmp_path: Path) -> None:
    users, items = random_table(200, 8, seed=7), random_table(50, 4, seed=8)
    np.save(tmp_path / "users.npy", users)
    np.save(tmp_path / "items.npy", items)
    (tmp_path / "tables.toml").write_text(
        '[[table]]\nname = "users"\nsource = "users.npy"\ndtype = "float16"\n'
        '[[table]]\nname = "items"\nsource = "items.npy"\ndevice = "cpu"\n'
    )
    process, target = _start(["--config", str(tmp_path / "tables.toml")])
    try:
        with EmbeddingClient(target) as client:
            infos = {t.name: t for t in client.tables()}
            assert (infos["users"].dtype, infos["users"].bytes) == ("float16", users.size * 2)
            assert infos["users"].is_default and infos["items"].dtype == "float32"
            np.testing.assert_array_equal(
                client.lookup([3, 199], "users"), users[[3, 199]].astype(np.float16)
            )
            np.testing.assert_array_equal(client.lookup([49], "items"), items[[49]])
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--table", "nameonly"], "table 'nameonly' is not NAME=PATH or NAME=PATH:KEY"),
        (["--config", "/nonexistent/tables.toml"], "--config /nonexistent/tables.toml:"),
        (["--snapshot-dir", "/nonexistent"], "--snapshot-dir /nonexistent: not a directory"),
        (["--admin-client-names", "ops"], "--admin-client-names needs mutual TLS"),
    ],
)
def test_flag_mistakes_are_one_line_not_the_usage(argv: list[str], message: str) -> None:
    """Before, the line that matters came after about 19 lines of usage text."""
    done = subprocess.run(
        [str(BIN / "embedding-server"), *argv],
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("embedding-server: error: ") and message in lines[0]
    assert lines[1] == "(embedding-server --help lists the options)"


def test_new_user_mistakes_get_a_clear_answer() -> None:
    for program in ("embedding-server", "embedding-client"):
        done = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith(f"{program} 0."), done
    done = _cli("lookup", "--ids", "99999999999999999999")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "99999999999999999999 does not fit in int64" in done.stderr.splitlines()[0]
    assert len(done.stderr.strip().splitlines()) == 2


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("localhost", "localhost:50051"),
        ("10.0.0.7", "10.0.0.7:50051"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:7000", "[::1]:7000"),
        ("host.example:443", "host.example:443"),
        ("dns:///embeddings.prod:50051", "dns:///embeddings.prod:50051"),
        ("unix:/run/embedding.sock", "unix:/run/embedding.sock"),
    ],
)
def test_a_target_without_a_port_gets_the_service_port(target: str, expected: str) -> None:
    """grpc itself would send `--target localhost` to port 443."""
    assert with_default_port(target) == expected
    with EmbeddingClient(target) as client:
        assert client.target == expected


def test_cli_target_without_a_port_reaches_50051_not_443() -> None:
    done = _cli("--target", "127.0.0.1", "--timeout", "2", "health")
    # Nothing listens there in a test run (it names the port it tried), or a server does.
    assert (done.returncode, "127.0.0.1:50051" in done.stderr) == (1, True) or (
        done.returncode == 0 and "SERVING" in done.stdout
    ), done.stderr


def _as_a_shell_starts_it() -> None:
    """In the child before exec: SIGINT at its default and unblocked, as an interactive
    shell starts a program. A test run started in the background (`make test &`, as CI
    may) has SIGINT ignored, POSIX shells' rule for asynchronous commands; Python keeps
    it ignored and every child inherits it: the Ctrl-C never came, and the call ran to
    grpc's 20 s handshake timeout (two full runs failed so)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_the_client_is_one_line(tmp_path: Path) -> None:
    """SIGINT while a call waits (here on a server that never answers: a listening socket
    nobody accepts from) prints `interrupted` and exits 130, not grpc's traceback."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        process = subprocess.Popen(
            [str(BIN / "embedding-client"), "--target", f"127.0.0.1:{port}", "--timeout", "30",
             "health"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_as_a_shell_starts_it,
        )  # fmt: skip
        connection = None
        try:
            # Its connection taken (and never answered): the call is under way, however
            # long the client took to start on a busy machine.
            silent.settimeout(60)
            connection, _ = silent.accept()
            time.sleep(0.2)
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            masks = [line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        finally:
            if connection is not None:
                connection.close()
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 130, (err, masks)
    assert err.strip() == "interrupted"


def test_a_tls_mistake_is_one_line_without_grpcs_own_log(served: tuple[str, Path]) -> None:
    """TLS against a plaintext server: the error line with its hint, and not grpc's C-core
    `I... ssl_transport_security.cc` line (GRPC_VERBOSITY unset, as a user has it)."""
    target, _ = served
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run([str(BIN / "embedding-client"), "--target", target, "--tls",
                           "--timeout", "5", "tables"], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE"), done.stderr
    assert lines[0].endswith("embedding-client without --tls / --tls-ca))")
