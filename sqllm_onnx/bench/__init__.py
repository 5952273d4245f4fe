"""Benchmark commands: `kernel` (the op against ORT MatMul / MatMulNBits) and `decode` (models)."""
