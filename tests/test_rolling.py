"""Rolling restarts seen by clients we did not write: a plain grpc channel with no retry
policy (as Go, Java, Triton's and KServe's clients run by default) and Triton's own
Python client, over two servers of one table that are stopped and started again one
after the other under load. Not one call may fail."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc

from .conftest import free_port, random_table, spawn_server
from .test_inference import foreign_python  # noqa: F401  # the fixture, used by name

TABLE = random_table(5_000, 24, seed=31)
# Connections are asked to go after about a second, so each stop takes a second or two.
SERVER_FLAGS = ("--grace", "10", "--connection-max-age", "1")


def lookups_handled(metrics_port: int) -> float:
    """How many Lookup calls the server behind `metrics_port` has answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total" and sample.labels["grpc_method"] == "Lookup"
    )


@contextmanager
def two_servers(tmp_path: Path) -> Iterator[tuple[str, Callable[..., list[float]]]]:
    """Two servers of TABLE; yields the channel target over both and a function that
    restarts them one after the other (SIGTERM, wait for exit 0, start again on the
    same port), returning how long each stop took. With `until_called`, each restarted
    server must answer that many Lookups before the next is stopped."""
    path = tmp_path / "t.npy"
    np.save(path, TABLE)
    ports = {free_port(): free_port() for _ in range(2)}  # gRPC port: metrics port

    def start(port: int) -> subprocess.Popen[str]:
        return spawn_server(path, port, *SERVER_FLAGS, "--metrics-port", str(ports[port]))

    servers = {port: start(port) for port in ports}

    def roll(until_called: int = 0) -> list[float]:
        took = []
        for port in ports:
            time.sleep(1.0)  # calls on both servers before each stop
            stopping = servers[port]
            started = time.monotonic()
            stopping.send_signal(signal.SIGTERM)
            output = stopping.communicate(timeout=60)[0]
            took.append(time.monotonic() - started)
            assert stopping.returncode == 0, output[-2000:]
            servers[port] = start(port)
            # The clients come back at their next reconnect attempt (see the test below).
            deadline = time.monotonic() + 30
            while lookups_handled(ports[port]) < until_called:
                assert time.monotonic() < deadline, "the clients did not come back in 30 s"
                time.sleep(0.1)
        time.sleep(1.0)
        return took

    try:
        yield "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports), roll
    finally:
        for process in servers.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_a_rolling_restart_fails_no_call_of_a_client_without_retries(tmp_path: Path) -> None:
    """16 callers on a round_robin channel over both servers, no service config (so no
    retry policy: grpc only resends what no server saw).

    A restarted server on its old address gets its calls back only at the channel's next
    reconnect attempt, which grpc spaces out while the address refuses (1 s, then x1.6
    each time, +-20 %, up to 120 s): a server gone 5 s may wait 4 s more. Stopping the
    other before then leaves the channel no server (1,420 failed calls in one run that
    stopped it 1 s after the first was SERVING). So, as an operator restarting servers in
    place must, the roll stops the next server once the restarted one answers calls."""
    outcomes: collections.Counter[str] = collections.Counter()
    wrong = 0
    stop = threading.Event()
    lock = threading.Lock()

    with two_servers(tmp_path) as (target, roll):
        channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
        lookup = pb_grpc.EmbeddingServiceStub(channel).Lookup

        def caller(seed: int) -> None:
            nonlocal wrong
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                ids = rng.integers(0, len(TABLE), size=64)
                request = pb.LookupRequest(table="t", ids=ids.astype("<i8").tobytes())
                try:
                    answer = lookup(request, timeout=10)
                    got = np.frombuffer(answer.vectors, "<f4").reshape(64, -1)
                    outcome, bad = "OK", not np.array_equal(got, TABLE[ids])
                except grpc.RpcError as exc:
                    outcome, bad = f"{exc.code().name}: {exc.details()}", False
                with lock:
                    outcomes[outcome] += 1
                    wrong += bad

        threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(16)]
        try:
            for thread in threads:
                thread.start()
            took = roll(until_called=200)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            channel.close()
    failed = {outcome: n for outcome, n in outcomes.items() if outcome != "OK"}
    assert not failed, failed
    assert wrong == 0
    assert outcomes["OK"] > 500, outcomes
    assert max(took) < 8, took  # connections left within their max age, not the grace


TRITON_LOAD = r"""
import json, os, sys, threading, time
import numpy as np
import tritonclient.grpc as triton

target, out, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
table = np.load(out + "-table.npy")
counts, lock = {}, threading.Lock()

def caller(seed):
    client = triton.InferenceServerClient(url=target)
    rng = np.random.default_rng(seed)
    while not os.path.exists(stop_file):
        ids = rng.integers(0, len(table), size=(4, 8))
        inputs = [triton.InferInput("ids", list(ids.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids)
        try:
            got = client.infer("t", inputs).as_numpy("embeddings")
            outcome = "OK" if np.array_equal(got, table[ids]) else "WRONG"
        except triton.InferenceServerException as exc:
            outcome = f"{exc.status()}: {exc.message()}"
        with lock:
            counts[outcome] = counts.get(outcome, 0) + 1

threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
json.dump(counts, open(out + ".json", "w"))
"""


def test_a_rolling_restart_fails_no_call_of_tritons_client(
    tmp_path: Path,
    foreign_python: Path,  # noqa: F811  # the fixture
) -> None:
    """Triton's Python client (its defaults: one channel, pick_first, no retry policy),
    8 callers of ModelInfer, given both addresses."""
    out = tmp_path / "triton"
    np.save(f"{out}-table.npy", TABLE)
    script = tmp_path / "triton_load.py"
    script.write_text(TRITON_LOAD)
    stop_file = tmp_path / "stop"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with two_servers(tmp_path) as (target, roll):
        load = subprocess.Popen(
            [str(foreign_python), str(script), target, str(out), str(stop_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        try:
            time.sleep(2.0)  # its clients connected and calling
            roll()
        finally:
            stop_file.touch()
            output = load.communicate(timeout=60)[0]
    assert load.returncode == 0, output[-2000:]
    counts = json.loads(out.with_suffix(".json").read_text())
    failed = {outcome: n for outcome, n in counts.items() if outcome != "OK"}
    assert not failed, failed
    assert counts.get("OK", 0) > 100, counts
