"""Every error doe-export raises on purpose derives from :class:`DoeExportError`.

Each class also derives from the builtin older callers caught (``ValueError`` / ``RuntimeError``).
The CLI turns any ``DoeExportError`` (and the runtime's ``DoeRuntimeError``) into ``error: ...``
and exit status 2; anything else is a bug and keeps its traceback.

Messages say what was found, what was expected and how to fix it.
"""

from __future__ import annotations


class DoeExportError(Exception):
    """Base of every error doe-export raises on purpose."""


class ConfigError(DoeExportError, ValueError):
    """A setting (flag, spec field) is out of range or contradicts another."""


class TaskDataError(DoeExportError, ValueError):
    """Task data is missing, malformed or too small; the message names the file (and line)."""


class ModelLoadError(DoeExportError, ValueError):
    """A model folder or hub id cannot be loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture family is not one the toolchain knows how to prune."""


class ExportValidationError(DoeExportError, RuntimeError):
    """An exported graph does not reproduce the PyTorch model."""
