"""Multi-tenant 1-bit delta matmul: the pure-PyTorch reference and (lazily imported) GPU kernels."""
