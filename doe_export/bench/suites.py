"""The suites beside the grid (``doe bench --suite ...``), one module each:

- :mod:`.layers` FFN vs heads vs both at matched budgets; :mod:`.peers` what users run today vs the
  experts; :mod:`.replace` the shipped bundle through ``Router`` against the plain dense export a
  user would deploy instead; :mod:`.switch` switching and loading experts; :mod:`.e2e` ``Router``
  with tokenization and length sorting; :mod:`.load` the HTTP server under concurrent requests;
  :mod:`.batching` single-text requests to the shipped bundle with dynamic batching off and on;
  :mod:`.memory` resident memory of N experts of one backbone with and without weight sharing.

Every suite writes ``<suite>.jsonl`` (an environment header, then one record per measurement)
and ``<suite>.md`` (+ PNGs) under the output folder. ``quick`` runs everything on a tiny random
BERT and generated data, so the code cannot rot; it asserts nothing about speed.
"""

from __future__ import annotations

from pathlib import Path

from . import (
    batching,
    common,
    e2e,
    gpu,
    gpu_report,
    layers,
    load,
    load_report,
    memory,
    peers,
    replace,
    replace_report,
    switch,
)
from .report import intro
from .workbench import QUICK, SuiteConfig, Workbench, header, make_bundles

SUITES = ("grid", "replace", "layers", "peers", "switch", "memory", "e2e", "load", "batching", "gpu")
CPU_SUITES = SUITES[:-1]  # `--suite all`: the gpu suite needs a GPU and runs alone
RENDERERS = {
    "layers": layers._render_layers,
    "peers": peers._render_peers,
    "switch": switch._render_switch,
    "e2e": e2e._render_e2e,
    "load": load_report._render_load,
    "batching": load_report.render_batching,
    "replace": replace_report.render_replace,
    "memory": memory.render_memory,
    "gpu": gpu_report.render_gpu,
}

__all__ = ["CPU_SUITES", "QUICK", "SUITES", "SuiteConfig", "render", "run"]


def run(
    suite: str, config: SuiteConfig, *, out_dir: Path, work: Path, cache: Path, progress: bool = True
) -> list[Path]:
    """Run one suite (not grid) and write its records and report; return the written paths."""
    out_dir = Path(out_dir)
    work = Path(work)
    if suite in ("layers", "peers", "replace"):
        bench = Workbench(config, cache, work / "graphs", progress)
        runner = {"layers": layers.run_layers, "peers": peers.run_peers, "replace": replace.run_replace}[suite]
        records = runner(config, bench)
        shape: dict = bench.shape
    else:
        root = work / "bundles"
        root.mkdir(parents=True, exist_ok=True)
        shape = {}
        if suite == "switch":
            records = switch.run_switch(config, root, progress)
        elif suite == "memory":
            records = memory.run_memory(config, work / "prompt-bundles", progress)
        elif suite == "load":
            records = load.run_load(config, work / "load-bundles", progress)
        elif suite == "batching":
            records = batching.run_batching(config, work / "batching", progress)
        elif suite == "gpu":
            records, shape = gpu.run_gpu(config, work / "gpu-bundles", progress)
        else:
            records = e2e.run_e2e(config, _ensure(config, root, progress))
    path = out_dir / f"{suite}.jsonl"
    common.write_jsonl(path, [header(config, suite, shape)] + records)
    return [path, render(path, out_dir)]


def _ensure(config: SuiteConfig, root: Path, progress: bool) -> Path:
    if not any((p / "manifest.json").is_file() for p in root.iterdir()):
        make_bundles(config, root, 1, progress)
    return root


def render(records_path: Path, out_dir: Path) -> Path:
    records = common.read_jsonl(records_path)
    head, rows = records[0], records[1:]
    suite = head["suite"]
    lines = RENDERERS[suite](rows, head["config"], intro(head, head["config"]), Path(out_dir))
    path = Path(out_dir) / f"{suite}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
