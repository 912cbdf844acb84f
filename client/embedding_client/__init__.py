"""Python client for the embedding lookup service (no torch needed).

from embedding_client import EmbeddingClient
with EmbeddingClient("localhost:50051") as client:
    vectors = client.lookup([[0, 2], [1, 2]])   # numpy, shape (2, 2, dim)
"""

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
