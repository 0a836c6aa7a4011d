"""doe-runtime: serve per-task DoE expert bundles with onnxruntime (no torch, no transformers)."""

from .bundle import SCHEMA_VERSION, check_task_name, read_manifest, verify_files
from .errors import (
    BundleError,
    ConfigError,
    DeviceError,
    DoeRuntimeError,
    InputError,
    RunError,
    TaskNameError,
    UnknownTaskError,
)
from .manifest import Manifest
from .router import Prediction, Router

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "BundleError",
    "ConfigError",
    "DeviceError",
    "DoeRuntimeError",
    "InputError",
    "Manifest",
    "Prediction",
    "Router",
    "RunError",
    "TaskNameError",
    "UnknownTaskError",
    "check_task_name",
    "read_manifest",
    "verify_files",
]
