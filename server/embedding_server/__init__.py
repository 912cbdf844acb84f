"""Embedding lookup server: tables on a device, served over gRPC with Prometheus metrics."""
