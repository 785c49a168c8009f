"""Offline tools (overlap analysis, pattern search, distillation, evaluation). They use the model and kernels,
never the engine's internals."""
