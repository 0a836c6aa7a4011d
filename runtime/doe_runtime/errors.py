"""Every error doe-runtime raises on purpose derives from :class:`DoeRuntimeError`.

Each class also derives from the builtin a caller would have caught before this hierarchy
existed (``ValueError``, ``LookupError``, ``TypeError``, ``RuntimeError``), so older ``except``
clauses keep working. The HTTP server maps status codes by class, never by the builtin:

==================  ===========================================================  ======
class               meaning                                                      HTTP
==================  ===========================================================  ======
TaskNameError       a task name outside ``[a-z0-9][a-z0-9._-]*``                 404
UnknownTaskError    no bundle for a (valid) task name                            404
InputError          inputs that do not fit the task (pairs vs single texts ...)  422
BundleError         a bundle on disk is missing, malformed or tampered with      503
DeviceError         ``device='cuda'`` demanded, no CUDA session                  503
RunError            onnxruntime failed while running a loaded graph               500
ConfigError         an option of Router / server / CLI out of range              (startup)
MissingExtraError   a feature whose optional extra is not installed              (startup)
==================  ===========================================================  ======

Messages say what was found, what was expected and how to fix it.
"""

from __future__ import annotations


class DoeRuntimeError(Exception):
    """Base of every error doe-runtime raises on purpose."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskNameError(DoeRuntimeError, ValueError):
    """A task name that cannot name a bundle (wrong characters, '..', too long, not a string)."""


class UnknownTaskError(DoeRuntimeError, LookupError):
    """The router has no bundle for the requested task."""


class InputError(DoeRuntimeError, TypeError):
    """The inputs given to ``predict`` do not fit the task."""


class BundleError(DoeRuntimeError, ValueError):
    """A bundle on disk is missing, malformed, tampered with or of an unknown version."""


class DeviceError(DoeRuntimeError, RuntimeError):
    """``device='cuda'`` was demanded but the session did not get the CUDA provider."""


class RunError(DoeRuntimeError, RuntimeError):
    """onnxruntime failed while running a loaded graph (the bundle passed its checks at load)."""


class ConfigError(DoeRuntimeError, ValueError):
    """An option given to Router, the server or the CLI is out of its range."""


class MissingExtraError(DoeRuntimeError, ImportError):
    """A feature needs an optional extra that is not installed (the message names the pip command)."""
