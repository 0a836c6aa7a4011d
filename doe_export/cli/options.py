"""What the subcommands share: defaults and choices read from the spec dataclasses, value parsers, and
the one rule for errors (the project's own error classes become ``error: ...`` and exit status 2;
anything else is a bug and keeps its traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from doe_runtime.errors import DoeRuntimeError

from ..errors import ConfigError, DoeExportError

PROJECT_ERRORS = (DoeExportError, DoeRuntimeError)


def field_default(cls: type, name: str) -> Any:
    """The default of one field of a spec (what the CLI shows and uses)."""
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            raise ConfigError(f"{cls.__name__}.{name} has no default")
    raise ConfigError(f"{cls.__name__} has no field {name!r}")


def default(cls: type, name: str) -> Any:
    """The default of ``cls.name`` as the command line writes it: enums as strings, tuples as comma lists."""
    value = field_default(cls, name)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def choices(enum: type[Enum]) -> list[str]:
    return [member.value for member in enum]


def positive_or_none(text: str) -> int | None:
    if text.lower() in ("none", "all", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names, blanks dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def numbers(text: str, kind: Callable[[str], Any] = int) -> tuple:
    """Comma-separated numbers; ConfigError naming the text when one is not a number."""
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated {getattr(kind, '__name__', 'value')}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"expected at least one value, got {text!r}")
    return values


def report_errors(prog: str, run: Callable[[], int]) -> int:
    """``run()``, with the project's own errors printed as ``prog: error: ...`` and exit status 2."""
    try:
        return run()
    except PROJECT_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def render_only(prog: str, records: Path, render: Callable[[Path, Path], Path]) -> int:
    """Re-render a report and its plots from existing records (nothing is measured again)."""
    if not records.is_file():
        print(f"{prog}: error: {records} not found; run it first (without --render-only)", file=sys.stderr)
        return 2
    print(render(records, records.parent))
    return 0


__all__ = ["choices", "default", "names", "numbers", "positive_or_none", "render_only", "report_errors"]
