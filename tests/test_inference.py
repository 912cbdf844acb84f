"""The Open Inference Protocol (KServe v2) beside embedding.v1: through real connections,
with our stubs here, and in `test_foreign_clients_*` with Triton's own client from PyPI.

Values must be the bits `Lookup` answers; every bad request gets its status code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from embedding_client import EmbeddingClient, Security
from embedding_client.proto import grpc_service_pb2 as oip
from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc
from embedding_server.core.lookup import Limits, Lookups
from embedding_server.transport import inference, servicer

from .conftest import ROOT, ServerFactory, make_store, random_table

TABLE = random_table(300, 24, seed=51)
Stub = oip_grpc.GRPCInferenceServiceStub


@pytest.fixture
def served(start_server: ServerFactory) -> Iterator[tuple[Stub, EmbeddingClient, int]]:
    server = start_server({"items": TABLE, "small": TABLE[:10]})
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    client = EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1)
    try:
        yield Stub(channel), client, server.port
    finally:
        client.close()
        channel.close()


def infer(ids: np.ndarray, model: str = "items", id_type: str = "INT64", call: str = "",
          **parameters: Any) -> oip.ModelInferRequest:  # fmt: skip
    """A ModelInfer request of `ids` (raw bytes of `id_type`), with request `parameters`."""
    request = oip.ModelInferRequest(model_name=model, id=call)
    request.inputs.add(name="ids", datatype=id_type, shape=list(ids.shape))
    request.raw_input_contents.append(ids.astype("<i8" if id_type == "INT64" else "<i4").tobytes())
    for name, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


def output(response: oip.ModelInferResponse, dtype: str = "<f4") -> np.ndarray:
    (tensor,) = response.outputs
    assert tensor.name == "embeddings"
    return np.frombuffer(response.raw_output_contents[0], dtype=dtype).reshape(tensor.shape)


def test_server_and_model_state_and_metadata(served: tuple[Stub, EmbeddingClient, int]) -> None:
    stub, _, _ = served
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="items")).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="items", version="1")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="items", version="7")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nope")).ready
    meta = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert meta.name == "embedding-server" and meta.version
    model = stub.ModelMetadata(oip.ModelMetadataRequest(name="items"))
    assert (model.name, list(model.versions), model.platform) == (
        "items",
        ["1"],
        "embedding_lookup",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("ids", "INT64", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("embeddings", "FP32", [-1, 24])
    ]


def test_model_infer_answers_the_bits_lookup_answers(
    served: tuple[Stub, EmbeddingClient, int],
) -> None:
    stub, client, _ = served
    ids = np.random.default_rng(3).integers(0, 300, (4, 6))
    response = stub.ModelInfer(infer(ids, call="call-1"))
    assert (response.model_name, response.model_version, response.id) == ("items", "1", "call-1")
    assert response.parameters["update_seq"].int64_param == 0
    assert output(response).tobytes() == client.lookup(ids, "items").tobytes()
    # INT32 ids; FP16 and BF16 answers (raw bytes: they have no typed field).
    assert output(stub.ModelInfer(infer(ids, id_type="INT32"))).tobytes() == (
        client.lookup(ids, "items").tobytes()
    )
    for datatype, name in (("FP16", "float16"), ("BF16", "bfloat16")):
        answer = stub.ModelInfer(infer(ids, datatype=datatype))
        assert answer.outputs[0].datatype == datatype
        assert answer.raw_output_contents[0] == client.lookup(ids, "items", name).tobytes()
    # The dense path, pooling over the last axis, a padding id.
    dense = output(stub.ModelInfer(infer(ids, dense=True)))
    assert dense.tobytes() == client.lookup_dense(ids, "items").tobytes()
    pooled = output(stub.ModelInfer(infer(ids, pooling="mean", padding_id=int(ids[0, 0]))))
    assert pooled.shape == (4, 24)
    want = client.lookup(ids, "items", pooling="mean", padding_id=int(ids[0, 0]))
    assert pooled.tobytes() == want.tobytes()
    # The datatype asked on the requested output; typed ids in, typed FP32 out.
    asked = infer(ids)
    asked.outputs.add(name="embeddings").parameters["datatype"].string_param = "FP16"
    assert stub.ModelInfer(asked).outputs[0].datatype == "FP16"
    typed = oip.ModelInferRequest(model_name="items")
    tensor = typed.inputs.add(name="ids", datatype="INT64", shape=[2, 3])
    tensor.contents.int64_contents.extend(ids[:2, :3].reshape(-1).tolist())
    answer = stub.ModelInfer(typed)
    assert not answer.raw_output_contents
    values = np.asarray(answer.outputs[0].contents.fp32_contents, dtype=np.float32)
    assert values.tobytes() == client.lookup(ids[:2, :3], "items").tobytes()
    typed.parameters["datatype"].string_param = "FP16"  # no typed field: raw, even so
    answer = stub.ModelInfer(typed)
    assert not answer.outputs[0].HasField("contents")
    assert answer.raw_output_contents[0] == client.lookup(ids[:2, :3], "items", "float16").tobytes()
    # The request says FP16, the requested output BF16: the output's wins (issue 29).
    typed.outputs.add(name="embeddings").parameters["datatype"].string_param = "BF16"
    answer = stub.ModelInfer(typed)
    assert answer.outputs[0].datatype == "BF16"
    assert (
        answer.raw_output_contents[0] == client.lookup(ids[:2, :3], "items", "bfloat16").tobytes()
    )
    # Typed INT32 ids (`int_contents`), as a client sending INT32 without raw bytes does.
    typed32 = oip.ModelInferRequest(model_name="items")
    tensor = typed32.inputs.add(name="ids", datatype="INT32", shape=[4, 6])
    tensor.contents.int_contents.extend(ids.reshape(-1).tolist())
    values = np.asarray(stub.ModelInfer(typed32).outputs[0].contents.fp32_contents, np.float32)
    assert values.tobytes() == client.lookup(ids, "items").tobytes()


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", "unknown table"),
        (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND", "version"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "INVALID_ARGUMENT", "INT64 or INT32"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT", "one input 'ids'"),
        (lambda r: r.inputs[0].shape.append(2), "INVALID_ARGUMENT", "needs"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -3), "INVALID_ARGUMENT", "negative dimension"),
        (lambda r: r.raw_input_contents.append(b"x"), "INVALID_ARGUMENT", "raw_input_contents"),
        (lambda r: r.parameters["polling"].SetInParent(), "INVALID_ARGUMENT", "unknown parameter"),
        (lambda r: setattr(r.parameters["pooling"], "string_param", "avg"), "INVALID_ARGUMENT",
         "sum, mean or max"),
        (lambda r: setattr(r.parameters["dense"], "string_param", "yes"), "INVALID_ARGUMENT",
         "true or false"),
        (lambda r: setattr(r.parameters["datatype"], "string_param", "FP64"), "INVALID_ARGUMENT",
         "FP32, FP16 or BF16"),
        (lambda r: r.outputs.add(name="logits"), "INVALID_ARGUMENT", "no output"),
        (lambda r: r.raw_input_contents.__setitem__(0, np.array([300, 1], "<i8").tobytes()),
         "INVALID_ARGUMENT", "out of range"),
        (lambda r: setattr(r.parameters["padding_id"], "int64_param", 10**6), "INVALID_ARGUMENT",
         "padding_id"),
        # A boolean where an integer goes is refused, not read as 0 or 1.
        (lambda r: setattr(r.parameters["padding_id"], "bool_param", True), "INVALID_ARGUMENT",
         "parameter 'padding_id' must be an integer row id, got True"),
        (lambda r: setattr(r.parameters["min_update_seq"], "int64_param", -1), "INVALID_ARGUMENT",
         "'min_update_seq' -1 is not an update_seq"),
        (lambda r: setattr(r.parameters["min_update_seq"], "bool_param", True),
         "INVALID_ARGUMENT", "'min_update_seq' must be an update_seq"),
        # No log and no update here: a replica that never reaches it refuses in time.
        (lambda r: setattr(r.parameters["min_update_seq"], "int64_param", 5), "UNAVAILABLE",
         "holds updates up to 0; the call asked for 5"),
    ],
)  # fmt: skip
def test_every_bad_request_gets_its_code(
    served: tuple[Stub, EmbeddingClient, int], change: Any, code: str, words: str
) -> None:
    stub, client, _ = served
    request = infer(np.array([1, 2]))
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=3)  # (a min_update_seq never reached waits it out)
    assert caught.value.code().name == code, caught.value.details()
    assert words in str(caught.value.details())
    assert client.health() == "SERVING"  # nothing else harmed


def test_it_needs_a_data_credential_like_lookup(start_server: ServerFactory) -> None:
    server = start_server({"items": TABLE}, auth_tokens=("data-token",))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = Stub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer(np.array([1])), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.ModelInfer(infer(np.array([1])), timeout=10,
                                 metadata=(("authorization", "Bearer data-token"),))  # fmt: skip
        assert output(answer).tobytes() == TABLE[[1]].tobytes()
    with EmbeddingClient(f"127.0.0.1:{server.port}", security=Security(token="data-token")) as c:
        assert c.lookup([1], "items").tobytes() == TABLE[[1]].tobytes()


# ------------------------------------------------------------------ Triton's and KServe's clients

FOREIGN = ROOT / ".venv-foreign"
# tritonclient[grpc] 2.73 needs protobuf < 7 and kserve 0.21 grpcio-tools < 1.82; ours need
# protobuf >= 7.35: their clients live in a virtual environment of their own, installed
# from their own lock (requirements/foreign.txt, made by `make lock`), remade when it changes.
FOREIGN_LOCK = ROOT / "requirements" / "foreign.txt"


@pytest.fixture(scope="module")
def foreign_python() -> Path:
    python = FOREIGN / "bin" / "python"
    stamp = FOREIGN / ".installed"
    lock = FOREIGN_LOCK.read_text()
    if not stamp.exists() or stamp.read_text() != lock:
        venv.create(FOREIGN, with_pip=True, clear=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--require-hashes", "-r", str(FOREIGN_LOCK)], capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot install Triton's client from PyPI here: {done.stderr[-500:]}")
        stamp.write_text(lock)
    return python


def run_foreign(python: Path, script: str, port: int, out: Path) -> dict[str, Any]:
    """Run `script` (argv: the server's address, an output prefix) in the foreign clients'
    environment against the server on `port`; the JSON report it writes to `out`.json."""
    path = out.with_name(f"{out.name}_call.py")  # not kserve.py: it would shadow the package
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), str(path), f"127.0.0.1:{port}", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(out.with_suffix(".json").read_text()))


TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

url, out = sys.argv[1], sys.argv[2]
client = triton.InferenceServerClient(url=url)
ids = np.array([[0, 5, 299], [7, 7, 1]], dtype=np.int64)
inputs = [triton.InferInput("ids", list(ids.shape), "INT64")]
inputs[0].set_data_from_numpy(ids)
result = client.infer("items", inputs, outputs=[triton.InferRequestedOutput("embeddings")])
np.save(out + "-fp32.npy", result.as_numpy("embeddings"))
half = client.infer("items", inputs, parameters={"datatype": "FP16", "pooling": "sum"})
np.save(out + "-fp16-sum.npy", half.as_numpy("embeddings"))
meta = client.get_model_metadata("items", as_json=True)
try:
    client.infer("nope", inputs)
    missing = "no error"
except triton.InferenceServerException as exc:
    missing = exc.status()
descriptor = service_pb2.DESCRIPTOR.serialized_pb.hex()
json.dump({"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready("items"), "metadata": meta,
           "server": client.get_server_metadata(as_json=True), "missing": missing,
           "descriptor": descriptor}, open(out + ".json", "w"))
"""


def test_tritons_client_gets_the_bits_lookup_answers(
    served: tuple[Stub, EmbeddingClient, int], foreign_python: Path, tmp_path: Path
) -> None:
    _, client, port = served
    out = tmp_path / "triton"
    report = run_foreign(foreign_python, TRITON_SCRIPT, port, out)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["name"] == "items"
    assert report["metadata"]["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": ["-1"]}]
    assert report["server"]["name"] == "embedding-server"
    assert report["missing"] == "StatusCode.NOT_FOUND"
    ids = np.array([[0, 5, 299], [7, 7, 1]])
    fp32 = np.load(f"{out}-fp32.npy")
    assert fp32.dtype == np.float32 and fp32.tobytes() == client.lookup(ids, "items").tobytes()
    fp16 = np.load(f"{out}-fp16-sum.npy")
    want = client.lookup(ids, "items", "float16", pooling="sum")
    assert fp16.dtype == np.float16 and fp16.tobytes() == want.tobytes()
    check_same_protocol(bytes.fromhex(report["descriptor"]))


def check_same_protocol(theirs_serialized: bytes) -> None:
    """Every method and message field of our .proto as Triton's client defines it: the
    same names, numbers, types and labels (theirs has more RPCs, which we do not serve)."""
    from google.protobuf import descriptor_pb2

    theirs = descriptor_pb2.FileDescriptorProto.FromString(theirs_serialized)
    ours = descriptor_pb2.FileDescriptorProto()
    oip.DESCRIPTOR.CopyToProto(ours)
    assert ours.package == theirs.package == "inference"

    def fields(message: Any, prefix: str = "") -> dict[str, tuple[Any, ...]]:
        found = {}
        for field in message.field:
            found[f"{prefix}{message.name}.{field.name}"] = (
                field.number,
                field.type,
                field.label,
                field.type_name.split(".")[-1],
            )
        for nested in message.nested_type:
            found.update(fields(nested, f"{prefix}{message.name}."))
        return found

    their_fields: dict[str, tuple[Any, ...]] = {}
    for message in theirs.message_type:
        their_fields.update(fields(message))
    our_fields: dict[str, tuple[Any, ...]] = {}
    for message in ours.message_type:
        our_fields.update(fields(message))
    assert our_fields and {k: their_fields.get(k) for k in our_fields} == our_fields
    their_methods = {
        m.name: (m.input_type, m.output_type) for s in theirs.service for m in s.method
    }
    for method in ours.service[0].method:
        assert their_methods[method.name] == (method.input_type, method.output_type)
    assert ours.service[0].name == theirs.service[0].name == "GRPCInferenceService"


KSERVE_SCRIPT = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient
from kserve.protocol.infer_type import InferInput, InferRequest

url, out = sys.argv[1], sys.argv[2]


async def main():
    client = InferenceGRPCClient(url=url)
    ids = np.array([[0, 5, 299], [7, 7, 1]], dtype=np.int64)
    raw = InferInput("ids", list(ids.shape), "INT64")
    raw.set_data_from_numpy(ids, binary_data=True)
    typed = InferInput("ids", list(ids.shape), "INT64")
    typed.set_data_from_numpy(ids, binary_data=False)
    answers = {}
    for name, tensor in (("raw", raw), ("typed", typed)):
        response = await client.infer(InferRequest(model_name="items", infer_inputs=[tensor]))
        np.save(f"{out}-{name}.npy", response.get_output_by_name("embeddings").as_numpy())
    report = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
              "model_ready": await client.is_model_ready("items")}
    await client.close()
    json.dump(report, open(out + ".json", "w"))


asyncio.run(main())
"""


def test_kserves_client_gets_the_bits_lookup_answers(
    served: tuple[Stub, EmbeddingClient, int], foreign_python: Path, tmp_path: Path
) -> None:
    _, client, port = served
    out = tmp_path / "kserve"
    report = run_foreign(foreign_python, KSERVE_SCRIPT, port, out)
    assert report == {"live": True, "ready": True, "model_ready": True}
    want = client.lookup(np.array([[0, 5, 299], [7, 7, 1]]), "items")
    for name in ("raw", "typed"):  # raw bytes in and out; typed ids in, typed FP32 out
        got = np.load(f"{out}-{name}.npy")
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), name


def test_large_answers_are_built_and_serialized_in_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raw answers over LOOP_ANSWER_BYTES and typed ones over TYPED_ON_LOOP_BYTES are
    built and serialized by `offload` (the handler pool), to the bytes the loop would
    have sent; smaller ones are built where the call runs."""
    handed: list[str] = []

    async def offload(call, *args, waits=False):  # type: ignore[no-untyped-def]
        handed.append(getattr(call, "__name__", "?"))
        return call(*args)

    limits = Limits(max_ids=1 << 20, max_dense_macs=1 << 40, dense_chunk_cells=1 << 22,
                    max_response_bytes=1 << 30)  # fmt: skip
    lookups = servicer.EmbeddingServicer(Lookups(make_store({"items": TABLE}), limits), offload)
    oip_servicer = inference.InferenceServicer(lookups, lambda: True)
    monkeypatch.setattr(inference, "LOOP_ANSWER_BYTES", 2 * 24 * 4)  # two rows
    monkeypatch.setattr(inference, "TYPED_ON_LOOP_BYTES", 24 * 4)  # one row
    context = SimpleNamespace(time_remaining=lambda: None)
    for count, typed, pooled in ((1, True, False), (2, True, True), (2, False, False),
                                 (3, False, True)):  # fmt: skip
        ids = np.arange(count)
        if typed:
            request = oip.ModelInferRequest(model_name="items")
            request.inputs.add(name="ids", datatype="INT64", shape=[count])
            request.inputs[0].contents.int64_contents.extend(ids.tolist())
        else:
            request = infer(ids)
        handed.clear()
        answer = asyncio.run(oip_servicer.ModelInfer(request, context))
        assert isinstance(answer, servicer.Serialized) is pooled
        assert handed == (["<lambda>"] if pooled else [])
        parsed = oip.ModelInferResponse.FromString(answer.SerializeToString())
        if typed:
            values = np.asarray(parsed.outputs[0].contents.fp32_contents, dtype=np.float32)
            assert values.tobytes() == TABLE[ids].tobytes()
        else:
            np.testing.assert_array_equal(output(parsed), TABLE[ids])
