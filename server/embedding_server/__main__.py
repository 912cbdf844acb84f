"""`python -m embedding_server` and the `embedding-server` console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server; say how to install it when the server extra is missing."""
    try:
        import prometheus_client  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(
            f"embedding-server: error: {exc.name} is not installed; the server needs the "
            "server extra: pip install 'embedding-service[server]'",
            file=sys.stderr,
        )
        return 2
    from embedding_server.server import serve

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
