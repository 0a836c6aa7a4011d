"""JSON-lines records with an environment header: what every study and benchmark writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import types
import typing
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .console import package_versions
from .errors import ConfigError

__all__ = ["cpu_model", "environment", "from_json", "read_jsonl", "spec_key", "to_json", "write_jsonl"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: list[int], providers: list[str]) -> dict:
    return {
        "kind": "environment",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "providers": providers,
        "platform": platform.platform(),
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- specs in records and keys


def _keyed(spec: Any) -> dict:
    """``spec``'s fields for its key: those it lists in ``KEY_SKIPS_DEFAULT`` are left out at their default."""
    fields = asdict(spec)
    for name in getattr(type(spec), "KEY_SKIPS_DEFAULT", ()):
        if fields[name] == type(spec).__dataclass_fields__[name].default:
            del fields[name]
    return fields


def spec_key(*specs: Any, extra: Any = None) -> str:
    """A short stable hash of frozen specs (and anything JSON-able beside them), for cache keys."""
    payload = [type(s).__name__ for s in specs] + [_keyed(s) for s in specs] + [extra]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_json(spec: Any) -> dict:
    """A spec (or a config holding specs) as plain JSON types: enums as strings, tuples as lists."""
    return json.loads(json.dumps(asdict(spec)))


T = TypeVar("T")


def from_json(cls: type[T], data: dict, where: str | None = None) -> T:
    """The dataclass ``cls`` from :func:`to_json`'s output: nested specs rebuilt, lists back to tuples
    where the field is a tuple. Unknown keys are refused, naming them."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _field_from_json(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _field_from_json(hint: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _field_from_json(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_json(hint, value, where)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        if len(args) > 1 and args[-1] is not Ellipsis:  # fixed-size tuple
            return tuple(_field_from_json(a, v, where) for a, v in zip(args, value))
        return tuple(_field_from_json(inner, v, where) if inner is not None else v for v in value)
    return value
