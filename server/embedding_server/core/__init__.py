"""The lookup core: tables and their files, the store, kernels, the batcher. Knows tensors
and devices, never protobuf."""
