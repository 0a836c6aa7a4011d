"""doe-export: find per-task experts (DoE), prune them physically, export ONNX bundles for doe_runtime."""

__version__ = "0.1.0"
