"""``doe study recovery``: which recovery keeps the metric after pruning, on `doe build`'s own flow.

For each task: the dense model adapted exactly as ``doe build`` adapts it (cached), one calibration
pass, then the same DoE pruning followed by each recovery variant (epochs x distillation weight x
trained parameters), each scored on dev and test. Records: ``recovery.jsonl``; report:
``recovery.md``. The default recovery of ``doe build`` is chosen from this table (best average
over the tasks, dev and test both shown).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from . import records
from .console import log
from .records import to_json
from .specs import BuildConfig
from .tasks import load_task

VARIANTS = {
    "1 epoch, cross-entropy": dict(epochs=1, distill=0.0),
    "1 epoch, distill 0.5": dict(epochs=1, distill=0.5),
    "1 epoch, distill 1.0": dict(epochs=1, distill=1.0),
    "2 epochs, distill 0.5": dict(epochs=2, distill=0.5),
    "2 epochs, distill 0.9": dict(epochs=2, distill=0.9),
    "3 epochs, distill 0.5": dict(epochs=3, distill=0.5),
}


DEFAULT_TASKS = ("bbc-news", "sst2")


def _scores(score) -> dict:
    return {"dev": score.dev, "test": score.test}


def run(
    tasks: tuple[str, ...],
    out_dir: Path,
    cache: Path,
    *,
    data_dir=None,
    build: BuildConfig | None = None,
    variants=None,
    progress: bool = True,
    datasets=None,
    loaded=None,
) -> Path:
    """Every recovery variant of ``build``'s flow on each task; records in ``out_dir/recovery.jsonl``."""
    from . import stages
    from .cache import adapted_path, cached_adapted
    from .loading import fast_tokenizer, load_model

    build = build or BuildConfig()
    variants = variants or VARIANTS
    loaded = loaded or load_model(build.model)
    path = Path(out_dir) / "recovery.jsonl"
    header = {
        **records.environment([1], []),
        "suite": "recovery",
        "config": {"build": to_json(build), "variants": variants},
    }
    rows = [header]
    for data in datasets or [load_task(task, build.data.seed, data_dir) for task in tasks]:
        splits = stages.Splits.of(data, build.data)
        tokenizer = fast_tokenizer(loaded.hf_tokenizer, build.data.max_length)
        dense = cached_adapted(
            adapted_path(Path(cache), build.model, data.name, build.data, build.adapt),
            loaded,
            data,
            build.adapt,
            tokenizer=tokenizer,
            splits=splits,
            data_spec=build.data,
            progress=progress,
            data_dir=data_dir,
        )
        score = stages.scorer(tokenizer, splits, dev=True)
        dense_scores = _scores(score(dense))
        stats = stages.calibration_stats(dense, tokenizer, splits.train, build.prune, progress=progress)
        for name, change in variants.items():
            start = time.perf_counter()
            result = stages.make_expert(
                dense,
                tokenizer,
                splits,
                build.prune,
                replace(build.recovery, **change),
                progress=progress,
                desc=f"[{data.name}] {name}",
                stats=stats,
                score=score,
            )
            after = _scores(result.after)
            rows.append(
                {
                    "kind": "recovery",
                    "task": data.name,
                    "variant": name,
                    **change,
                    "metric": data.metric,
                    "dense": dense_scores,
                    "before": _scores(result.before),
                    "after": after,
                    "best_epoch": result.recovery.get("best_epoch"),
                    "split": splits.test.name,
                    "split_size": len(splits.test),
                    "dev_size": len(splits.dev),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            log(
                f"[{data.name}] {name}: test {after['test']:.4f} (dense {dense_scores['test']:.4f}), dev "
                f"{after['dev']:.4f}"
            )
            records.write_jsonl(path, rows)
    render(path, Path(out_dir))
    return path


def render(records_path: Path, out_dir: Path) -> Path:
    rows = records.read_jsonl(records_path)
    head, rows = rows[0], [r for r in rows[1:] if r.get("kind") == "recovery"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    build = head["config"]["build"]
    lines = [
        "# Recovery: which re-training keeps the metric after pruning",
        "",
        f"`doe build`'s flow (fine-tuned `{build['model']}`, at most {build.get('data', build)['max_train']} training examples, "
        f"DoE, FFN p = {build.get('prune', build)['rate']:g}), then each recovery variant (every remaining weight trains, "
        "distillation from the dense model with the given weight at T = 2, best dev epoch kept). Cells: "
        "test (dev) x100; the loss against the dense model in brackets. Environment: "
        f"{head['cpu']}, recorded {head['created']}.",
        "",
        "| variant | " + " | ".join(tasks) + " | average test loss |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    dense = {r["task"]: r["dense"] for r in rows}
    lines.append(
        "| dense | " + " | ".join(f"{100 * dense[t]['test']:.1f} ({100 * dense[t]['dev']:.1f})" for t in tasks) + " | |"
    )
    averages = {}
    for variant in variants:
        cells, losses = [], []
        for task in tasks:
            match = [r for r in rows if r["task"] == task and r["variant"] == variant]
            if not match:
                cells.append("—")
                continue
            r = match[0]
            loss = 100 * (r["dense"]["test"] - r["after"]["test"])
            losses.append(loss)
            cells.append(f"{100 * r['after']['test']:.1f} ({100 * r['after']['dev']:.1f}) [{loss:+.1f}]")
        averages[variant] = sum(losses) / len(losses) if len(losses) == len(tasks) else float("nan")
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {averages[variant]:+.2f} |")
    before = {t: next(r["before"]["test"] for r in rows if r["task"] == t) for t in tasks}
    lines += [
        "",
        "Before recovery (pruning alone): " + ", ".join(f"{t} {100 * v:.1f}" for t, v in before.items()) + ".",
        "",
    ]
    finite = {k: v for k, v in averages.items() if v == v}
    if finite:
        best = min(finite, key=lambda name: finite[name])
        lines += [
            f"Smallest average loss: **{best}** ({finite[best]:+.2f} points). Test splits of a few hundred "
            "items move 0.1-0.25 points per item: differences under a point are within noise.",
            "",
        ]
    path = Path(out_dir) / "recovery.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
