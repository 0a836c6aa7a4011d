"""doe-runtime: serve per-task DoE expert bundles with onnxruntime (no torch, no transformers)."""

from .bundle import SCHEMA_VERSION, BundleError, check_task_name, read_manifest, verify_files
from .router import DeviceError, InputError, Prediction, Router, UnknownTaskError

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "DeviceError",
    "InputError",
    "Prediction",
    "Router",
    "UnknownTaskError",
    "check_task_name",
    "read_manifest",
    "verify_files",
]
