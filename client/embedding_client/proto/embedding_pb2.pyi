from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT8_ROWWISE: _ClassVar[DType]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_NONE: _ClassVar[Pooling]
    POOLING_SUM: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT8_ROWWISE: DType
POOLING_NONE: Pooling
POOLING_SUM: Pooling
POOLING_MEAN: Pooling
POOLING_MAX: Pooling

class Shape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "ids", "ids_list", "ids_shape", "dtype", "pooling", "offsets", "lengths", "per_id_weights", "padding_id", "expect_shard", "min_update_seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    IDS_LIST_FIELD_NUMBER: _ClassVar[int]
    IDS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PER_ID_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PADDING_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECT_SHARD_FIELD_NUMBER: _ClassVar[int]
    MIN_UPDATE_SEQ_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    ids_list: _containers.RepeatedScalarFieldContainer[int]
    ids_shape: Shape
    dtype: DType
    pooling: Pooling
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    per_id_weights: bytes
    padding_id: int
    expect_shard: ShardOf
    min_update_seq: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., ids_list: _Optional[_Iterable[int]] = ..., ids_shape: _Optional[_Union[Shape, _Mapping]] = ..., dtype: _Optional[_Union[DType, str]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., per_id_weights: _Optional[bytes] = ..., padding_id: _Optional[int] = ..., expect_shard: _Optional[_Union[ShardOf, _Mapping]] = ..., min_update_seq: _Optional[int] = ...) -> None: ...

class ShardOf(_message.Message):
    __slots__ = ("index", "count")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("vectors", "dtype", "shape", "table", "table_version", "update_seq")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SEQ_FIELD_NUMBER: _ClassVar[int]
    vectors: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    table: str
    table_version: int
    update_seq: int
    def __init__(self, vectors: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., table: _Optional[str] = ..., table_version: _Optional[int] = ..., update_seq: _Optional[int] = ...) -> None: ...

class LookupManyRequest(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureLookup]
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureLookup, _Mapping]]] = ...) -> None: ...

class FeatureLookup(_message.Message):
    __slots__ = ("feature", "lookup")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_FIELD_NUMBER: _ClassVar[int]
    feature: str
    lookup: LookupRequest
    def __init__(self, feature: _Optional[str] = ..., lookup: _Optional[_Union[LookupRequest, _Mapping]] = ...) -> None: ...

class LookupManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FeatureResult]
    def __init__(self, results: _Optional[_Iterable[_Union[FeatureResult, _Mapping]]] = ...) -> None: ...

class FeatureResult(_message.Message):
    __slots__ = ("feature", "result")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    feature: str
    result: LookupResponse
    def __init__(self, feature: _Optional[str] = ..., result: _Optional[_Union[LookupResponse, _Mapping]] = ...) -> None: ...

class LookupStreamResponse(_message.Message):
    __slots__ = ("sequence", "result", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    result: LookupResponse
    error: StreamError
    def __init__(self, sequence: _Optional[int] = ..., result: _Optional[_Union[LookupResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "rows", "dim", "dtype", "device", "version", "bytes", "is_default", "shard", "shard_rows", "update_seq", "update_log", "keyed", "keys", "max_keys", "missing_keys", "bags_skip_missing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ROWS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SEQ_FIELD_NUMBER: _ClassVar[int]
    UPDATE_LOG_FIELD_NUMBER: _ClassVar[int]
    KEYED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_FIELD_NUMBER: _ClassVar[int]
    MISSING_KEYS_FIELD_NUMBER: _ClassVar[int]
    BAGS_SKIP_MISSING_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    dim: int
    dtype: DType
    device: str
    version: int
    bytes: int
    is_default: bool
    shard: ShardOf
    shard_rows: int
    update_seq: int
    update_log: bool
    keyed: bool
    keys: int
    max_keys: int
    missing_keys: str
    bags_skip_missing: bool
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., device: _Optional[str] = ..., version: _Optional[int] = ..., bytes: _Optional[int] = ..., is_default: _Optional[bool] = ..., shard: _Optional[_Union[ShardOf, _Mapping]] = ..., shard_rows: _Optional[int] = ..., update_seq: _Optional[int] = ..., update_log: _Optional[bool] = ..., keyed: _Optional[bool] = ..., keys: _Optional[int] = ..., max_keys: _Optional[int] = ..., missing_keys: _Optional[str] = ..., bags_skip_missing: _Optional[bool] = ...) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class UpdateRowsRequest(_message.Message):
    __slots__ = ("table", "ids", "vectors", "dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    vectors: bytes
    dtype: DType
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., vectors: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class UpdateRowsResponse(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ...) -> None: ...

class SnapshotTableRequest(_message.Message):
    __slots__ = ("table", "path", "overwrite")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    table: str
    path: str
    overwrite: bool
    def __init__(self, table: _Optional[str] = ..., path: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class SnapshotTableResponse(_message.Message):
    __slots__ = ("table", "version", "bytes", "path", "update_seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SEQ_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    version: int
    bytes: int
    path: str
    update_seq: int
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ..., version: _Optional[int] = ..., bytes: _Optional[int] = ..., path: _Optional[str] = ..., update_seq: _Optional[int] = ...) -> None: ...

class ReloadTableRequest(_message.Message):
    __slots__ = ("table", "source")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    source: str
    def __init__(self, table: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ReloadTableResponse(_message.Message):
    __slots__ = ("table", "load_seconds")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    load_seconds: float
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ..., load_seconds: _Optional[float] = ...) -> None: ...
