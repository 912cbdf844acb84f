"""Python client for the embedding lookup service (no torch needed).

from embedding_client import EmbeddingClient
with EmbeddingClient("localhost:50051") as client:
    vectors = client.lookup([[0, 2], [1, 2]])   # numpy, shape (2, 2, dim)

The names below are imported when first used (PEP 562), so that importing a submodule
alone (`embedding_client.cli`, which sets grpc's log verbosity before grpc starts) does not
load grpc first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedding_client.client import (
        AsyncEmbeddingClient,
        EmbeddingClient,
        EmbeddingError,
        Feature,
        LookupResult,
        Pooling,
        Security,
        TableInfo,
    )

__all__ = [
    "AsyncEmbeddingClient",
    "EmbeddingClient",
    "EmbeddingError",
    "Feature",
    "LookupResult",
    "Pooling",
    "Security",
    "TableInfo",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from embedding_client import client

        return getattr(client, name)
    raise AttributeError(f"module 'embedding_client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
