"""Service benchmark: the embedding server against a raw-gRPC ceiling and Redis MGET.

Every figure comes from one run on one machine, so the ratios compare like with like:

- `Lookup`, `LookupDense`, `LookupStream`: a real `embedding-server` process (demo table
  V x 128 float32); `LookupStream` sends each worker's calls over one open stream;
  `ModelInfer` (with `--load h2load` only): the same lookup through the Open Inference
  Protocol, as Triton's client sends it;
- `ceiling`: a bare grpc server in the same framework with no service logic at all
  (ids bytes in, `table[ids].tobytes()` out), the limit of one Python gRPC process;
- `redis`: Debian's `redis-server` on loopback, rows stored as packed float32 values,
  fetched with MGET: what users would pick instead.

Load comes from separate client processes (asyncio, many calls in flight each), for a
bounded time per cell, on loopback only. Besides throughput and latency each cell reports
the server's CPU time per call (the process and its children, over the measured window).
Prints a markdown table, writes it and a plot (service.md, service.png under --out), and
with bare servers measured, each target against the strongest of them
(service-vs-bare.png, with issue 12's 1.15x and 90% lines).

    .venv/bin/python bench/service.py                       (make bench-service)
    .venv/bin/python bench/service.py --batch 1,1024 --concurrency 1,32 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import numpy as np

DIM = 128
BIN = Path(sys.executable).parent


def _numbers(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_table(rows: int) -> np.ndarray:
    # The server's seeded demo table, rebuilt with numpy alone.
    return np.random.default_rng(0).standard_normal((rows, DIM), dtype=np.float32)


# ---------------------------------------------------------------- the raw-gRPC ceiling


CEILINGS = ("sync", "aio", "sync+malloc", "aio+malloc")


def ceiling_server(port: int, rows: int, workers: int, flavour: str = "sync") -> None:
    """A grpc server with no service logic: raw ids bytes in, table[ids] bytes out.

    `flavour`: "sync" (grpc.server on a thread pool of `workers`) or "aio" (grpc.aio on
    one event loop), each optionally "+malloc": the server's own allocator tuning
    (`tune_allocator`, what `embedding-server --malloc-tune true` does: glibc's mmap and
    trim thresholds raised, one arena; DESIGN.md: re-faulting fresh pages for every
    0.5-8 MB response halved throughput at B >= 1,024).
    """
    import grpc

    if flavour.endswith("+malloc"):
        from embedding_server.process.server import tune_allocator

        tune_allocator()
    table = demo_table(rows)
    options = [("grpc.max_send_message_length", 1 << 30),
               ("grpc.max_receive_message_length", 1 << 30), ("grpc.so_reuseport", 0)]  # fmt: skip
    if flavour.startswith("aio"):
        from aio_probe import serve_aio  # bench/, beside this script

        async def lookup_async(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return table[np.frombuffer(request, dtype="<i8")].tobytes()

        serve_aio(port, "ceiling", grpc.unary_unary_rpc_method_handler(lookup_async))
        return

    def lookup(request: bytes, context: grpc.ServicerContext) -> bytes:
        return table[np.frombuffer(request, dtype="<i8")].tobytes()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    handler = grpc.unary_unary_rpc_method_handler(lookup)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("ceiling", {"Lookup": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


# ---------------------------------------------------------------- load generator (client side)


def _caller(target: str, kind: str, batch: int, rows: int) -> Callable[..., object]:
    """An async function doing one call of `kind`, plus what it needs (made in the process)."""
    if kind == "redis":
        import redis.asyncio as redis

        host, port = target.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port), max_connections=512)

        async def call(ids: np.ndarray) -> object:
            values = await client.mget([f"r{i}" for i in ids.tolist()])
            return np.frombuffer(b"".join(values), dtype="<f4")

        return call
    import grpc

    options = [
        ("grpc.max_receive_message_length", 1 << 30),
        ("grpc.max_send_message_length", 1 << 30),
    ]
    channel = grpc.aio.insecure_channel(target, options=options)
    if kind == "ceiling":
        method = channel.unary_unary("/ceiling/Lookup")

        async def call(ids: np.ndarray) -> object:
            return np.frombuffer(await method(ids.tobytes(), timeout=60), dtype="<f4")

        return call
    from embedding_client import codec
    from embedding_client.proto import embedding_pb2_grpc as pb_grpc

    stub = pb_grpc.EmbeddingServiceStub(channel)
    if kind == "LookupStream":
        streams: dict[object, object] = {}  # one open stream per worker task

        async def call(ids: np.ndarray) -> object:
            task = asyncio.current_task()
            stream = streams.get(task)
            if stream is None:
                stream = streams[task] = stub.LookupStream()
            await stream.write(codec.encode_lookup_request(ids, None, "float32"))  # type: ignore[attr-defined]
            answer = await stream.read()  # type: ignore[attr-defined]
            return codec.decode_vectors(answer.result)

        return call
    rpc = stub.LookupDense if kind == "LookupDense" else stub.Lookup

    async def call(ids: np.ndarray) -> object:
        request = codec.encode_lookup_request(ids, None, "float32")
        return codec.decode_vectors(await rpc(request, timeout=60))

    return call


def client_process(target: str, kind: str, batch: int, rows: int, inflight: int,
                   start_at: float, seconds: float, seed: int, out: mp.Queue) -> None:  # fmt: skip
    async def run() -> np.ndarray:
        call = _caller(target, kind, batch, rows)
        rng = np.random.default_rng(seed)
        id_sets = [rng.integers(0, rows, size=batch, dtype=np.int64) for _ in range(64)]
        latencies: list[float] = []
        end = start_at + seconds

        async def worker(offset: int) -> None:
            await call(id_sets[0])  # connect (and open its stream) before the clock starts
            await asyncio.sleep(max(0.0, start_at - time.time()))
            n = offset
            while time.time() < end:
                began = time.perf_counter()
                await call(id_sets[n % len(id_sets)])
                if time.time() <= end:
                    latencies.append(time.perf_counter() - began)
                n += 1

        await asyncio.gather(*(worker(i) for i in range(inflight)))
        return np.asarray(latencies)

    try:
        out.put(("ok", asyncio.run(run())))
    except Exception as exc:  # report, do not hang the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a server process and all its descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            times = process.cpu_times()
            total += times.user + times.system
    except psutil.Error:  # a worker that just exited: its time is lost, not an error
        pass
    return total


def measure(target: str, kind: str, batch: int, rows: int, concurrency: int, seconds: float,
            processes: int, server_pid: int | None = None) -> dict[str, float]:  # fmt: skip
    """One cell: req/s, rows/s, MB/s, latency percentiles and, given the server's pid, its
    CPU time per call over the measured window (a steadier figure than req/s on a shared
    machine: it does not depend on how much CPU the load generator left the server)."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    procs = min(processes, concurrency)
    share = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    start_at = time.time() + 2.5  # spawned clients import and connect first
    workers = [
        ctx.Process(target=client_process,
                    args=(target, kind, batch, rows, share[i], start_at, seconds, i, queue))
        for i in range(procs)
    ]  # fmt: skip
    for worker in workers:
        worker.start()
    cpu: list[float] = []
    load_cpu: list[float] = []

    def sample() -> None:  # server's and load generator's CPU time at the window's ends
        for at in (start_at, start_at + seconds):
            time.sleep(max(0.0, at - time.time()))
            if server_pid is not None:
                cpu.append(server_cpu_seconds(server_pid))
            load_cpu.append(sum(server_cpu_seconds(w.pid) for w in workers if w.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    sampler.join(timeout=10)
    errors = [r[1] for r in results if r[0] == "error"]
    if errors:
        raise RuntimeError(f"{kind} B={batch} C={concurrency}: {errors[0]}")
    latencies = np.concatenate([r[1] for r in results]) * 1e3
    rps = len(latencies) / seconds
    p50, p99, p999 = np.percentile(latencies, [50, 99, 99.9]) if len(latencies) else (0, 0, 0)
    cpu_us = (cpu[1] - cpu[0]) / len(latencies) * 1e6 if len(cpu) == 2 and len(latencies) else 0.0
    # The load generator's share of the machine: near 100% would make it, not the server,
    # the limit (its CPU per call is in the table too).
    load = load_cpu[1] - load_cpu[0] if len(load_cpu) == 2 else 0.0
    return {"req_s": rps, "rows_s": rps * batch, "mb_s": rps * batch * DIM * 4 / 1e6,
            "p50": p50, "p99": p99, "p999": p999, "calls": len(latencies),
            "cpu_us": cpu_us, "load_us": load / len(latencies) * 1e6 if len(latencies) else 0.0,
            "load_pct": 100 * load / seconds / (os.cpu_count() or 1)}  # fmt: skip


# ---------------------------------------------------------------- h2load: a load that is not Python

H2LOAD_KINDS = ("Lookup", "LookupDense", "ModelInfer", "ceiling")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def grpc_body(kind: str, batch: int, rows: int, seed: int = 0) -> tuple[str, bytes]:
    """The HTTP/2 path and the gRPC-framed request body (a 0 byte, a 4-byte big-endian
    length, the message) h2load sends for `kind`: the same ids on every call."""
    ids = np.random.default_rng(seed).integers(0, rows, size=batch, dtype=np.int64)
    if kind == "ceiling":
        path, message = "/ceiling/Lookup", ids.tobytes()
    elif kind == "ModelInfer":  # the Open Inference Protocol, as Triton's client sends it
        from embedding_client.proto import grpc_service_pb2 as oip

        request = oip.ModelInferRequest(model_name="demo")
        request.inputs.add(name="ids", datatype="INT64", shape=[batch])
        request.raw_input_contents.append(ids.tobytes())
        path, message = "/inference.GRPCInferenceService/ModelInfer", request.SerializeToString()
    else:
        from embedding_client import codec

        path = f"/embedding.v1.EmbeddingService/{kind}"
        message = codec.encode_lookup_request(ids, None, "float32").SerializeToString()
    return path, b"\x00" + len(message).to_bytes(4, "big") + message


def measure_h2load(target: str, kind: str, batch: int, rows: int, concurrency: int,
                   seconds: float, server_pid: int | None) -> dict[str, float]:  # fmt: skip
    """One cell driven by h2load: `batch` ids of `kind` per call (see `h2load_cell`)."""
    path, body = grpc_body(kind, batch, rows)
    return h2load_cell(target, path, body, batch * DIM * 4, batch, concurrency, seconds,
                       server_pid)  # fmt: skip


def h2load_cell(target: str, path: str, body: bytes, vector_bytes: int, rows_per_call: int,
                concurrency: int, seconds: float, server_pid: int | None) -> dict[str, float]:  # fmt: skip
    """h2load (nghttp2's HTTP/2 load generator, in C) sending the gRPC-framed `body` to
    `path` for `seconds`, `concurrency` calls in flight over up to 2 connections, as the
    Python load does. h2load counts HTTP statuses, not gRPC ones, so the response bytes
    are checked: every call must have brought back its `vector_bytes` of vectors.
    Latency: h2load gives the mean, no percentiles."""
    connections = min(2, concurrency)
    streams = -(-concurrency // connections)
    with tempfile.NamedTemporaryFile(suffix=".grpc") as data:
        data.write(body)
        data.flush()
        before = server_cpu_seconds(server_pid) if server_pid else 0.0
        load_before = children_cpu()
        process = subprocess.Popen(
            ["h2load", "-c", str(connections), "-m", str(streams), "-t", "1",
             "-D", f"{seconds:g}", "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-d", data.name, f"http://{target}{path}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        output = process.communicate(timeout=seconds + 60)[0]
        after = server_cpu_seconds(server_pid) if server_pid else 0.0
        usage = children_cpu() - load_before
    done = _h2load_number(output, r"requests: .* (\d+) succeeded, (\d+) failed, (\d+) errored")
    data_bytes = _h2load_number(output, r"traffic: .*\((\d+)\) data")
    succeeded, failed, errored = done
    if process.returncode != 0 or failed or errored or not succeeded:
        raise RuntimeError(f"h2load {path} C={concurrency}: {output[-600:]}")
    if data_bytes[0] / succeeded < vector_bytes:  # a gRPC error has no vectors
        raise RuntimeError(f"h2load {path}: calls came back without their vectors")
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", output)
    rps = succeeded / seconds
    return {"req_s": rps, "rows_s": rps * rows_per_call, "mb_s": rps * vector_bytes / 1e6,
            "p50": float(mean.group(1)) * _UNITS[mean.group(2)] if mean else float("nan"),
            "p99": float("nan"), "p999": float("nan"), "calls": succeeded,
            "cpu_us": (after - before) / succeeded * 1e6 if server_pid else 0.0,
            "load_us": usage / succeeded * 1e6,
            "load_pct": 100 * usage / seconds / (os.cpu_count() or 1)}  # fmt: skip


def _h2load_number(output: str, pattern: str) -> tuple[int, ...]:
    found = re.search(pattern, output)
    if found is None:
        raise RuntimeError(f"unexpected h2load output: {output[-600:]}")
    return tuple(int(g) for g in found.groups())


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for (h2load, once
    it is done; the servers and Python load generators still run, so do not count)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- targets (server side)


def wait_port(
    port: int, process: subprocess.Popen | mp.Process | None = None, timeout: float = 60
) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def start_redis(rows: int, workdir: Path) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    import redis

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port)
    client = redis.Redis(port=port)
    table = demo_table(rows)
    pipe = client.pipeline(transaction=False)
    for i in range(rows):
        pipe.set(f"r{i}", table[i].tobytes())
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    return process, port


SERVICE_KINDS = ("Lookup", "LookupDense", "LookupStream", "ModelInfer")


def _variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, embedding-server flags) of each server configuration to measure."""
    if not args.variants:
        return [("", args.server_args)]
    pairs = [part.partition("=") for part in args.variants.split(";") if part.strip()]
    return [(label.strip(), f"{args.server_args} {flags}") for label, _, flags in pairs]


def _applies(kind: str, batch: int, concurrency: int, args: argparse.Namespace) -> bool:
    if kind.startswith("ModelInfer") and args.load != "h2load":
        return False  # the Python load speaks embedding.v1 only
    # LookupDense is ~1e4x slower: a big batch would take the whole time budget; the
    # server takes at most --max-streams open streams.
    too_dense = kind.startswith("LookupDense") and batch > args.max_dense_batch
    return not too_dense and not (
        kind.startswith("LookupStream") and concurrency > args.max_streams
    )


def _flag_value(flags: str, flag: str, default: int) -> int:
    words = flags.split()
    return int(words[words.index(flag) + 1]) if flag in words else default


def wait_listening(
    port: int, process: subprocess.Popen, listeners: int, timeout: float = 120
) -> None:  # type: ignore[type-arg]
    """Wait until `listeners` sockets listen on `port`: with --processes N, each of the
    N server processes has its own (SO_REUSEPORT); the kernel only picks listening ones."""
    deadline = time.monotonic() + timeout
    while _listening(port) < listeners:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"embedding-server on port {port} did not start")
        time.sleep(0.2)


def _listening(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=_numbers, default=_numbers("1,64,1024,16384"))
    parser.add_argument("--concurrency", type=_numbers, default=_numbers("1,8,32,128"))
    parser.add_argument("--kinds", default="Lookup,LookupStream,LookupDense,ceiling,redis")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the demo table")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--processes", type=int, default=2, help="client processes per cell")
    parser.add_argument("--workers", type=int, default=4,
                        help="handler threads of the ceiling and (unless a variant sets "
                             "--workers) of the embedding server")  # fmt: skip
    parser.add_argument("--max-dense-batch", type=int, default=64,
                        help="largest batch sent to LookupDense (it is ~1e4x slower)")  # fmt: skip
    parser.add_argument("--max-streams", type=int, default=8,
                        help="LookupStream only up to this many in flight (the server's --max-streams)")  # fmt: skip
    parser.add_argument("--server-args", default="", help="extra embedding-server flags")
    parser.add_argument("--variants", default="",
                        help="compare server configurations side by side: 'LABEL=FLAGS;LABEL=FLAGS' "
                        "(e.g. '1p=;2p=--processes 2'); each runs its own embedding-server and "
                        "names its rows KIND[LABEL]. FLAGS starting with @TREE run the server "
                        "from that source tree, e.g. a `git worktree` of an earlier commit: "
                        "'before=@/tmp/before;after='")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every cell this many times, targets interleaved, and "
                        "report the median (single cells vary up to ~1.7x on a shared VM)")  # fmt: skip
    parser.add_argument("--load", choices=("python", "h2load"), default="python",
                        help="load generator: client processes in Python (asyncio grpc, "
                        "decoding every answer), or h2load (C, HTTP/2, prebuilt gRPC "
                        "frames; Lookup, LookupDense and ceiling only)")  # fmt: skip
    parser.add_argument("--ceilings", default=",".join(CEILINGS),
                        help="bare server flavours measured as `ceiling` (comma-separated: "
                        f"{', '.join(CEILINGS)}); each cell is compared with the strongest")  # fmt: skip
    parser.add_argument("--aio-probe", nargs="?", const="inline", default="",
                        help="also measure `Lookup[aio-MODE]`: the service's Lookup path "
                        "served by grpc.aio (bench/aio_probe.py; a probe, not a server), for "
                        "each comma-separated MODE: inline (on the event loop, the default), "
                        "executor (awaited in the handler pool), migration (grpc.aio's own "
                        "pool for sync handlers), floor (no service logic at all: parse, take, "
                        "frame the answer; the least a server of the contract does)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if args.load == "h2load":
        if shutil.which("h2load") is None:
            parser.error("--load h2load needs h2load: apt-get install nghttp2-client")
        dropped = [k for k in kinds if k not in H2LOAD_KINDS]
        if dropped:
            print(f"--load h2load drives {', '.join(H2LOAD_KINDS)} only: leaving out "
                  f"{', '.join(dropped)}")  # fmt: skip
            kinds = [k for k in kinds if k in H2LOAD_KINDS]
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    processes: list[subprocess.Popen | mp.Process] = []  # type: ignore[type-arg]
    targets: dict[str, str] = {}
    pids: dict[str, int | None] = {}
    try:
        service_kinds = [k for k in kinds if k in SERVICE_KINDS]
        served: list[str] = []
        for label, flags in _variants(args):
            if not service_kinds:
                break
            port = free_port()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            words = flags.split()
            if words and words[0].startswith("@"):  # the server from another source tree
                tree = Path(words.pop(0)[1:]).resolve()
                env["PYTHONPATH"] = f"{tree / 'server'}{os.pathsep}{tree / 'client'}"
            server = subprocess.Popen(
                [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
                 "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--demo-rows", str(args.rows),
                 "--workers", str(args.workers), "--log-level", "WARNING", *words],
                env=env,
            )  # fmt: skip
            processes.append(server)
            wait_listening(port, server, _flag_value(flags, "--processes", 1))
            for kind in service_kinds:
                name = f"{kind}[{label}]" if label else kind
                targets[name] = f"127.0.0.1:{port}"
                pids[name] = server.pid
                served.append(name)
        kinds = served + [k for k in kinds if k not in SERVICE_KINDS]
        for mode in filter(None, args.aio_probe.split(",")):
            from aio_probe import MODES, probe_server  # bench/, beside this script

            if mode not in MODES:
                parser.error(f"--aio-probe: unknown mode {mode!r}; known: {', '.join(MODES)}")
            name = "Lookup[aio-probe]" if mode == "inline" else f"Lookup[aio-{mode}]"
            port = free_port()
            probe = mp.get_context("spawn").Process(
                target=probe_server, args=(port, args.rows, mode), daemon=True
            )
            probe.start()
            processes.append(probe)
            wait_port(port, timeout=120)  # imports torch and builds the demo table first
            kinds.insert(len(served), name)
            targets[name] = f"127.0.0.1:{port}"
            pids[name] = probe.pid
        if "ceiling" in kinds:
            # Every bare server flavour asked for; each cell compares against the strongest.
            flavours = [f for f in args.ceilings.split(",") if f]
            unknown = sorted(set(flavours) - set(CEILINGS))
            if unknown:
                parser.error(
                    f"--ceilings: unknown {', '.join(unknown)}; known: {', '.join(CEILINGS)}"
                )
            at = kinds.index("ceiling")
            kinds[at : at + 1] = [f"ceiling[{f}]" for f in flavours]
            for flavour in flavours:
                port = free_port()
                ceiling = mp.get_context("spawn").Process(
                    target=ceiling_server, args=(port, args.rows, args.workers, flavour),
                    daemon=True,
                )  # fmt: skip
                ceiling.start()
                processes.append(ceiling)
                wait_port(port)
                targets[f"ceiling[{flavour}]"] = f"127.0.0.1:{port}"
                pids[f"ceiling[{flavour}]"] = ceiling.pid
        if "redis" in kinds:
            if shutil.which("redis-server") is None:
                print("redis-server not installed (apt-get install redis-server): skipping redis")
                kinds.remove("redis")
            else:
                redis_process, port = start_redis(args.rows, work)
                processes.append(redis_process)
                targets["redis"] = f"127.0.0.1:{port}"
                pids["redis"] = redis_process.pid
        time.sleep(1.0)  # let the servers settle (the embedding server builds its demo table)
        print(f"service benchmark on {os.cpu_count()} cores, demo table {args.rows} x {DIM} float32, "
              f"{args.seconds:.0f} s per cell, {args.processes} client processes", flush=True)  # fmt: skip
        results: list[dict[str, object]] = []
        for batch in args.batch:
            for concurrency in args.concurrency:
                cell = [k for k in kinds if _applies(k, batch, concurrency, args)]
                runs: dict[str, list[dict[str, float]]] = {k: [] for k in cell}
                for _ in range(args.repeat):
                    for kind in cell:  # interleaved, so drifts of the machine hit all alike
                        how = measure_h2load if args.load == "h2load" else measure
                        row = how(targets[kind], kind.split("[")[0], batch, args.rows,
                                  concurrency, args.seconds, *(() if how is measure_h2load
                                  else (args.processes,)), pids.get(kind))  # fmt: skip
                        runs[kind].append(row)
                        print(f"  {kind:15} B={batch:>6} C={concurrency:>4}: {row['req_s']:9.0f} req/s "
                              f"{row['rows_s']:12,.0f} rows/s  p50 {row['p50']:8.2f} ms  "
                              f"p99 {row['p99']:8.2f} ms  server CPU {row['cpu_us']:7.0f} us/call",
                              flush=True)  # fmt: skip
                for kind, rows in runs.items():
                    median = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
                    results.append(
                        {"kind": kind, "batch": batch, "concurrency": concurrency, **median}
                    )
    finally:
        for process in processes:
            if isinstance(process, subprocess.Popen):
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
            else:
                process.terminate()
                process.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    return 0


def is_ceiling(kind: object) -> bool:
    return str(kind).split("[")[0] == "ceiling"


def strongest_bare(
    results: list[dict[str, object]],
) -> dict[tuple[object, object], dict[str, object]]:
    """Per (batch, in flight): the bare servers' best rows/s and lowest CPU per call, and
    which flavour gave each."""
    best: dict[tuple[object, object], dict[str, object]] = {}
    for r in results:
        if not is_ceiling(r["kind"]):
            continue
        cell = best.setdefault((r["batch"], r["concurrency"]), {})
        if r["rows_s"] > cell.get("rows_s", -1.0):  # type: ignore[operator]
            cell["rows_s"], cell["rows_by"] = r["rows_s"], r["kind"]
        if r["cpu_us"] and r["cpu_us"] < cell.get("cpu_us", float("inf")):  # type: ignore[operator]
            cell["cpu_us"], cell["cpu_by"] = r["cpu_us"], r["kind"]
    return best


def _ms(value: object) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: h2load gives no percentiles


def report(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    best = strongest_bare(results)
    lines = [
        f"Service benchmark: {os.cpu_count()} cores, demo table {args.rows} x {DIM} float32, "
        f"{args.seconds:.0f} s per cell, "
        + (
            "h2load (C, 2 connections; p50 column: its mean latency), "
            if args.load == "h2load"
            else f"{args.processes} client processes (asyncio), "
        )
        + f'median of {args.repeat} interleaved run(s) per cell. "vs bare": against the '
        "strongest bare server of the cell (most rows/s; least server CPU per call). "
        '"load CPU": the load generator\'s CPU, per call and as a share of all cores.',
        "",
        "| target | B | in flight | req/s | rows/s | MB/s | p50 ms | p99 ms | p99.9 ms | "
        "server CPU us/call | rows/s vs bare | CPU vs bare | load CPU us/call | load CPU % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cell = best.get((r["batch"], r["concurrency"]), {})
        share = f"{r['rows_s'] / cell['rows_s']:.0%}" if cell.get("rows_s") else "-"  # type: ignore[operator]
        cpu = f"{r['cpu_us'] / cell['cpu_us']:.2f}x" if cell.get("cpu_us") and r["cpu_us"] else "-"  # type: ignore[operator]
        lines.append(
            f"| {r['kind']} | {r['batch']:,} | {r['concurrency']} | {r['req_s']:,.0f} | "
            f"{r['rows_s']:,.0f} | {r['mb_s']:,.1f} | {_ms(r['p50'])} | {_ms(r['p99'])} | "
            f"{_ms(r['p999'])} | {r['cpu_us']:,.0f} | {share} | {cpu} | {r['load_us']:,.0f} | "
            f"{r['load_pct']:.0f}% |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service.md").write_text(text + "\n")
    plot(results, args.out / "service.png", "mean" if args.load == "h2load" else "p50")
    written = [args.out / "service.md", args.out / "service.png"]
    if any(is_ceiling(r["kind"]) for r in results):
        plot_against_bare(results, args.out / "service-vs-bare.png")
        written.append(args.out / "service-vs-bare.png")
    print(f"\nwrote {', '.join(str(path) for path in written)}")


def plot(results: list[dict[str, object]], path: Path, latency: str = "p50") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for kind in dict.fromkeys(str(r["kind"]) for r in results):
        best: dict[int, dict[str, object]] = {}
        for r in results:
            if r["kind"] == kind:
                batch = int(r["batch"])  # type: ignore[call-overload]
                if batch not in best or r["rows_s"] > best[batch]["rows_s"]:  # type: ignore[operator]
                    best[batch] = r
        batches = sorted(best)
        left.plot(batches, [best[b]["rows_s"] for b in batches], marker="o", label=kind)
        # Latency at the fewest calls in flight measured (not only 1: a run may have none).
        mine = [r for r in results if r["kind"] == kind]
        fewest = min(int(r["concurrency"]) for r in mine)  # type: ignore[call-overload]
        single = sorted((r for r in mine if r["concurrency"] == fewest),
                        key=lambda r: r["batch"])  # type: ignore[arg-type,return-value]  # fmt: skip
        right.plot([r["batch"] for r in single], [r["p50"] for r in single], marker="o",
                   label=f"{kind} ({fewest} in flight)")  # fmt: skip
    left.set(xscale="log", yscale="log", xlabel="ids per call (B)", ylabel="rows/s (best over in-flight)",
             title="throughput")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="ids per call (B)", ylabel=f"{latency} latency, ms",
              title="latency with the fewest calls in flight")  # fmt: skip
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_against_bare(results: list[dict[str, object]], path: Path) -> None:
    """Each target's server CPU per call and rows/s against the strongest bare server of
    each cell, by batch size, one line per calls in flight; the targets of issue 12 (at
    most 1.15x the CPU, at least 90% of the rows/s) drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = strongest_bare(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    lines: dict[tuple[str, object], list[dict[str, object]]] = {}
    for r in results:
        if not is_ceiling(r["kind"]) and best.get((r["batch"], r["concurrency"])):
            lines.setdefault((str(r["kind"]), r["concurrency"]), []).append(r)
    colours: dict[str, str] = {}
    fewest = min((inflight for _, inflight in lines), default=0)
    for (kind, inflight), cells in lines.items():
        cells.sort(key=lambda r: r["batch"])  # type: ignore[arg-type,return-value]
        batches = [r["batch"] for r in cells]
        cells_best = [best[(r["batch"], r["concurrency"])] for r in cells]
        cpu = [r["cpu_us"] / b["cpu_us"] for r, b in zip(cells, cells_best, strict=True)]  # type: ignore[operator]
        rows = [100 * r["rows_s"] / b["rows_s"] for r, b in zip(cells, cells_best, strict=True)]  # type: ignore[operator]
        # One colour per target; the fewest calls in flight solid, more dashed.
        look = {"color": colours.setdefault(kind, f"C{len(colours)}"), "marker": "o",
                "linestyle": "-" if inflight == fewest else "--",
                "label": f"{kind}, {inflight} in flight"}  # fmt: skip
        left.plot(batches, cpu, **look)  # type: ignore[arg-type]
        right.plot(batches, rows, **look)  # type: ignore[arg-type]
    left.axhline(1.15, color="black", linewidth=1, linestyle=":", label="target: 1.15x")
    right.axhline(90, color="black", linewidth=1, linestyle=":", label="target: 90%")
    left.set(xscale="log", xlabel="ids per call (B)", ylabel="x the strongest bare server",
             title="server CPU per call (lower is better)")  # fmt: skip
    right.set(xscale="log", xlabel="ids per call (B)", ylabel="% of the strongest bare server",
              title="rows/s (higher is better)")  # fmt: skip
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
