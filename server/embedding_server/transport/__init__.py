"""The gRPC transport: servicers, the interceptor every call passes, who may call what, and
the bounds on connections. Knows protobuf and status codes."""
