"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) over the
lookup core, beside embedding.v1 on the same port: Triton's and KServe's clients call
the tables unchanged.

Each table is a model named after it, at the table's version. `ModelInfer` takes one
input `ids` (INT64 or INT32, any shape, as raw bytes or typed contents) and answers one
output `embeddings`, shape ids.shape + [dim], through the same servicer path as `Lookup`
(the same limits, checks, metrics and bits). Request parameters choose the rest:

- `datatype` (string): FP32 (default), FP16 or BF16; also accepted on the requested
  `embeddings` output;
- `dense` (bool): the one-hot matmul path (LookupDense);
- `pooling` (string): sum, mean or max over the last axis of the ids (EmbeddingBag);
- `padding_id` (int): an id whose row is zeros, skipped in bags.

Answers come as raw bytes (`raw_output_contents`), or as typed `fp32_contents` when the
ids came typed and the output is FP32 (FP16 and BF16 have no typed field). Status codes,
credentials (a data token), draining and metrics are the interceptor's, as for every RPC.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np

from embedding_client import codec
from embedding_client.proto import grpc_service_pb2 as oip
from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc
from embedding_server.errors import QUOTE_CHARS, InvalidRequest, TableNotFound, quoted
from embedding_server.transport.servicer import (
    LOOP_ANSWER_BYTES,
    EmbeddingServicer,
    Serialized,
)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INPUT, OUTPUT = "ids", "embeddings"
INPUT_DTYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "INT32": np.dtype("<i4")}
OUTPUT_DTYPES = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}
POOLING = ("sum", "mean", "max")
# Parameters the protocol's clients send on their own (tritonclient: sequences, priority,
# timeout); accepted and not used. Any other unknown name is refused: a typo must not
# silently change nothing.
IGNORED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
     "binary_data_output", "binary_data", "headers"}
)  # fmt: skip
KNOWN_PARAMETERS = frozenset({"datatype", "dense", "pooling", "padding_id", "min_update_seq"})
PLATFORM = "embedding_lookup"
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Typed answers (`fp32_contents`) up to this size are built on the event loop (raw ones
# up to the servicer's LOOP_ANSWER_BYTES).
TYPED_ON_LOOP_BYTES = 64 << 10


def _value(parameter: oip.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _typed(parameters: Any, name: str, kind: type, what: str) -> Any:
    if name not in parameters:
        return None
    value = _value(parameters[name])
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"parameter {name!r} must be {what}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A caller's parameter value for a message: strings quoted and cut as all caller
    text is, anything else (bytes of any length included) by its repr, cut likewise."""
    if isinstance(value, str):
        return quoted(value)
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the lookup servicer; `ready()` says whether
    the server takes requests (false while it drains)."""

    def __init__(self, lookups: EmbeddingServicer, ready: Callable[[], bool]) -> None:
        self.lookups = lookups
        self.store = lookups.lookups.store
        self.ready = ready

    def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.ready())

    def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> oip.ModelReadyResponse:
        name = self.store.resolve_name(request.name) if request.name else None
        table = None if name is None else self.store.get(name)
        ready = table is not None and request.version in ("", str(table.version))
        return oip.ModelReadyResponse(ready=ready and self.ready())

    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Any
    ) -> oip.ServerMetadataResponse:
        try:
            version = metadata.version("embedding-service")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return oip.ServerMetadataResponse(name="embedding-server", version=version)

    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Any
    ) -> oip.ModelMetadataResponse:
        table = self._model(request.name, request.version)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=table.name,
            versions=[str(table.version)],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype="INT64", shape=[-1])],
            outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, table.dim])],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Any
    ) -> oip.ModelInferResponse | Serialized:
        self._model(request.model_name, request.model_version)
        ids, typed_input = self._ids(request)
        options = self._options(request)
        lookup = codec.encode_lookup_request(
            ids, request.model_name, OUTPUT_DTYPES[options["datatype"]],
            pooling=options["pooling"], padding_id=options["padding_id"],
        )  # fmt: skip
        if options["min_update_seq"]:  # read your writes, as Lookup's min_update_seq
            lookup.min_update_seq = options["min_update_seq"]
        result = await self.lookups.lookup_request(
            "ModelInfer", lookup, context, dense=options["dense"]
        )
        typed = typed_input and options["datatype"] == "FP32"
        answer = functools.partial(_answer, request.id, result, options["datatype"], typed)
        # A large answer is built and serialized in the handler pool, like Lookup's: raw
        # values cost a copy each way, typed ones ~10 ns each to add.
        if result.nbytes <= (TYPED_ON_LOOP_BYTES if typed else LOOP_ANSWER_BYTES):
            return answer()
        return Serialized(await self.lookups.offload(lambda: answer().SerializeToString()))

    def _model(self, name: str, version: str) -> Any:
        if not name:
            raise InvalidRequest("model_name is empty: name a table (ModelMetadata lists none "
                                 "by itself; embedding.v1 ListTables does)")  # fmt: skip
        table = self.store.get(name)
        if version and version != str(table.version):
            raise TableNotFound(
                f"model {quoted(name)} is at version {table.version}; version "
                f"{quoted(version)} is not served (leave model_version empty for the current)"
            )
        return table

    def _ids(self, request: oip.ModelInferRequest) -> tuple[np.ndarray, bool]:
        """The ids (int64, their shape) and whether they came as typed contents."""
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            names = ", ".join(quoted(i.name) for i in request.inputs[:5]) or "none"
            raise InvalidRequest(
                f"a model here takes one input {INPUT!r} (INT64 or INT32, any shape); got {names}"
            )
        tensor = request.inputs[0]
        dtype = INPUT_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidRequest(
                f"input {INPUT!r} has datatype {quoted(tensor.datatype)}; use INT64 or INT32"
            )
        shape = tuple(tensor.shape)
        count = codec.shape_ids(shape, f"input {INPUT!r} shape")
        if request.raw_input_contents and tensor.HasField("contents"):
            raise InvalidRequest(
                f"input {INPUT!r} is sent twice, as typed contents and as "
                "raw_input_contents: the protocol allows one of them"
            )
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidRequest(f"{len(request.raw_input_contents)} raw_input_contents "
                                     "for 1 input")  # fmt: skip
            raw = request.raw_input_contents[0]
            if len(raw) != count * dtype.itemsize:
                raise InvalidRequest(
                    f"input {INPUT!r}: shape {list(shape)} of {tensor.datatype} needs "
                    f"{count * dtype.itemsize} bytes, raw_input_contents holds {len(raw)}"
                )
            values = np.frombuffer(raw, dtype=dtype)
            typed = False
        else:
            field = (
                tensor.contents.int64_contents
                if dtype.itemsize == 8
                else tensor.contents.int_contents
            )
            self.lookups.lookups.check_count(len(field), "ids")  # before they are copied
            if len(field) != count:
                raise InvalidRequest(
                    f"input {INPUT!r}: shape {list(shape)} holds {count} ids, its contents "
                    f"hold {len(field)} (give {tensor.datatype} values, or raw_input_contents)"
                )
            values = np.asarray(field, dtype=np.int64)
            typed = True
        return values.astype(np.int64, copy=False).reshape(shape), typed

    def _options(self, request: oip.ModelInferRequest) -> dict[str, Any]:
        parameters = request.parameters
        unknown = sorted(set(parameters) - KNOWN_PARAMETERS - IGNORED_PARAMETERS)
        if unknown:
            shown = ", ".join(quoted(n) for n in unknown[:5])
            raise InvalidRequest(
                f"unknown parameter(s) {shown}; this server reads "
                f"{', '.join(sorted(KNOWN_PARAMETERS))}"
            )
        datatype = _typed(parameters, "datatype", str, "FP32, FP16 or BF16")
        for output in request.outputs:
            if output.name != OUTPUT:
                raise InvalidRequest(
                    f"no output {quoted(output.name)}: the one output is {OUTPUT!r}"
                )
            asked = _typed(output.parameters, "datatype", str, "FP32, FP16 or BF16")
            datatype = asked or datatype
        datatype = datatype or "FP32"
        if datatype not in OUTPUT_DTYPES:
            raise InvalidRequest(f"datatype {quoted(datatype)}: use FP32, FP16 or BF16")
        pooling = _typed(parameters, "pooling", str, "sum, mean or max")
        if pooling is not None and pooling not in POOLING:
            raise InvalidRequest(f"pooling {quoted(pooling)}: use sum, mean or max")
        padding_id = _typed(parameters, "padding_id", int, "an integer row id")
        if padding_id is not None and not INT64_MIN <= padding_id <= INT64_MAX:
            raise InvalidRequest(f"parameter 'padding_id' {padding_id} is not an int64 row id")
        min_update_seq = _typed(parameters, "min_update_seq", int, "an update_seq")
        if min_update_seq is not None and not 0 <= min_update_seq <= INT64_MAX:
            raise InvalidRequest(
                f"parameter 'min_update_seq' {min_update_seq} is not an update_seq (0 or more)"
            )
        return {
            "datatype": datatype,
            "min_update_seq": min_update_seq,
            "dense": bool(_typed(parameters, "dense", bool, "true or false")),
            "pooling": pooling,
            "padding_id": padding_id,
        }


def _answer(
    call_id: str, result: codec.EncodedLookupResponse, datatype: str, typed: bool
) -> oip.ModelInferResponse:
    """The ModelInferResponse of `result`: its vectors as typed `fp32_contents` when
    `typed`, else as raw bytes."""
    output = oip.ModelInferResponse.InferOutputTensor(
        name=OUTPUT, datatype=datatype, shape=result.shape
    )
    response = oip.ModelInferResponse(
        model_name=result.table, model_version=str(result.version), id=call_id
    )
    # The updates the rows hold (the version names the loaded table only): what a later
    # call's min_update_seq asks for.
    response.parameters["update_seq"].int64_param = result.update_seq
    if typed:
        output.contents.fp32_contents.extend(np.frombuffer(result.vectors, dtype="<f4"))
    else:
        response.raw_output_contents.append(bytes(result.vectors))
    response.outputs.append(output)
    return response


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    """Add the protocol's service to `server` (a grpc server, or what stands in for one:
    the interceptor that wraps every service)."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
