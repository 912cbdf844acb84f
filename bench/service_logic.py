"""The service's own Python per call, without gRPC: parse a LookupRequest, run the
servicer's Lookup (limits, id checks, the gather, metrics) and encode the answer, against
the bare handler body of bench/service.py's ceiling servers (numpy's take of the ids) and
the floor of bench/aio_probe.py (parse, take, frame the answer: no service logic).

What is left after the transport: the per-call cost no transport change removes.

    .venv/bin/python bench/service_logic.py
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any

import aio_probe  # bench/, beside this script
import numpy as np
import torch

from embedding_client.proto import embedding_pb2 as pb
from embedding_server.core.lookup import Limits, Lookups
from embedding_server.core.sources import demo_table
from embedding_server.core.store import TableStore
from embedding_server.transport.servicer import EmbeddingServicer


class _Context:  # what the servicer asks of grpc's context on this path
    def time_remaining(self) -> None:
        return None


def finished(work: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine that never suspends (a plain lookup never does), without
    an event loop's scheduling around it."""
    try:
        work.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the lookup suspended: it went the general way")


def per_call_us(call: object, calls: int, repeat: int = 5) -> float:
    """Median over `repeat` runs of the process CPU time per call, in microseconds."""
    for _ in range(20):
        call()  # type: ignore[operator]
    runs = []
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(calls):
            call()  # type: ignore[operator]
        runs.append((time.process_time() - started) / calls * 1e6)
    return sorted(runs)[repeat // 2]


def main() -> None:
    store = TableStore()
    store.add(demo_table(100_000, 128, 0, torch.device("cpu")))
    limits = Limits(max_ids=1 << 20, max_dense_macs=1 << 40, dense_chunk_cells=1 << 22,
                    max_response_bytes=1 << 30)  # fmt: skip
    servicer = EmbeddingServicer(Lookups(store, limits))
    table = store.get("demo").host_array()
    floor_handler = aio_probe.floor_handler(store.get("demo"))
    rng = np.random.default_rng(0)
    print("| B | bare handler body us/call | floor us/call | service logic us/call "
          "| service - floor |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch in (1, 64, 1024, 16384):
        ids = rng.integers(0, 100_000, batch).astype("<i8")
        body = pb.LookupRequest(table="demo", ids=ids.tobytes()).SerializeToString()
        raw = ids.tobytes()

        def bare(raw: bytes = raw) -> bytes:
            return table[np.frombuffer(raw, dtype="<i8")].tobytes()

        def floor(body: bytes = body) -> bytes:  # aio_probe's floor handler, as grpc runs it
            request = floor_handler.request_deserializer(body)
            return floor_handler.response_serializer(
                finished(floor_handler.unary_unary(request, None))
            )

        def service(body: bytes = body) -> bytes:
            request = pb.LookupRequest.FromString(body)
            answer = finished(servicer.Lookup(request, _Context()))  # type: ignore[arg-type]
            return answer.SerializeToString()

        calls = max(200, 200_000 // batch)
        a, f, b = (per_call_us(c, calls) for c in (bare, floor, service))
        print(f"| {batch:,} | {a:,.1f} | {f:,.1f} | {b:,.1f} | {b - f:+,.1f} |")


if __name__ == "__main__":
    main()
