"""The process around the server: the gRPC server with its metrics endpoint and shutdown, the
handler pool, and several server processes on one port."""
