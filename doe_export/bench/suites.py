"""The suites beside the grid: layers, peers, switch, end-to-end (``doe bench --suite ...``).

- ``layers``: FFN neurons vs attention heads vs both, removed by DoE at matched parameter budgets
  on real tasks; task metric after recovery next to the speed-up over the dense graph and the
  FLOP bound of each expert's own shape.
- ``peers``: on the same inputs in one run: PyTorch eager dense, ONNX dense, ONNX expert, the
  expert after onnxruntime fusions, and int8 dynamic quantization of the fused expert (FFN-only
  and both layer types), each with its task metric.
- ``switch``: the unplug-and-play cost: round-robin requests over N resident experts vs one,
  cold load time and resident memory per expert, the router's overhead over a bare
  ``session.run``.
- ``e2e``: ``Router.predict`` throughput with tokenization, with and without length sorting.

Every suite writes ``<suite>.jsonl`` (an environment header, then one record per measurement)
and ``<suite>.md`` (+ PNGs) under the output folder. ``quick`` runs everything on a tiny random
BERT and generated data, so the code cannot rot; it asserts nothing about speed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import common

SUITES = ("grid", "layers", "peers", "switch", "e2e", "load")


@dataclass(frozen=True)
class SuiteConfig:
    model: str = "packaged:all-MiniLM-L6-v2"
    data_dir: str | None = None
    layer_tasks: tuple[str, ...] = ("sst2", "rte")
    peers_task: str = "sst2"
    # share of the prunable (FFN + attention projection) parameters removed; each layer type gets
    # the rate that removes that many parameters (skipped where that rate would be >= max_rate)
    budgets: tuple[float, ...] = (0.2, 0.3, 0.43, 0.65)
    max_rate: float = 0.95
    ffn_rate: float = 0.65  # the peers' FFN expert
    both_rates: tuple[float, float] = (0.65, 0.65)  # the peers' "both" expert: FFN rate, head rate
    batch: int = 8
    tokens: int = 128
    threads: int = 1
    repeats: int = 7
    min_seconds: float = 1.0
    switch_tasks: tuple[int, ...] = (2, 5, 10)
    switch_requests: int = 20
    e2e_items: int = 512
    e2e_batch: int = 32
    load_seconds: float = 60.0
    load_warmup_seconds: float = 10.0
    load_connections: int = 32
    load_tasks: int = 3
    load_memory_arena: bool = True
    # a separate Python with optimum-onnx (it needs transformers < 4.58, so it cannot share ours):
    # the peers suite then also times the dense model exported by `optimum-cli export onnx`
    optimum_python: str | None = None
    seed: int = 0
    tiny: bool = False
    # adaptation, attribution and recovery (as in the localization study, so numbers compare)
    adapt: str = "finetune"
    lr: float | None = 5e-5
    epochs: int = 3
    max_train: int = 1024
    max_eval: int = 1000
    max_length: int = 64
    calib_examples: int = 256
    recovery_examples: int = 500
    prompt_length: int = 20


QUICK = dict(adapt="prompt", lr=None, layer_tasks=("toy",), peers_task="toy", budgets=(0.3,), batch=2, tokens=16, repeats=2, min_seconds=0.0,
             switch_tasks=(2,), switch_requests=2, e2e_items=24, e2e_batch=8, load_seconds=3.0,
             load_warmup_seconds=1.0, load_connections=4, load_tasks=2, tiny=True, epochs=1, max_train=48,
             max_eval=24, max_length=24, calib_examples=16, recovery_examples=24, prompt_length=4)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_feeds(vocab: int, batch: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1000, vocab, size=(batch, tokens)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


class Workbench:
    """What the layers and peers suites share: the model, the tasks' adapted models and
    calibration statistics (cached on disk, the study's cache layout), ONNX export + validation."""

    def __init__(self, config: SuiteConfig, cache: Path, work: Path, progress: bool):
        from ..study import StudyConfig

        self.config, self.cache, self.work, self.progress = config, Path(cache), Path(work), progress
        if config.tiny:
            from ..loading import tiny_model

            self.loaded = tiny_model(config.seed)
        else:
            from ..loading import load_model

            self.loaded = load_model(config.model)
        self.study_config = StudyConfig(
            model="tiny" if config.tiny else config.model, epochs=config.epochs, max_train=config.max_train,
            max_eval=config.max_eval, max_length=config.max_length, calib_examples=config.calib_examples,
            recovery_examples=config.recovery_examples, prompt_length=config.prompt_length, seed=config.seed,
            adapt=config.adapt, lr=config.lr,
        )
        self._runners = {}
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def shape(self) -> dict:
        cfg = self.loaded.backbone.config
        return {"hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
                "heads": cfg.num_attention_heads, "vocab": cfg.vocab_size,
                "max_positions": getattr(cfg, "max_position_embeddings", None)}

    def runner(self, task: str):
        from ..study import TaskRunner
        from ..tasks import load_task, synthetic_task

        if task not in self._runners:
            data = synthetic_task(task) if self.config.tiny else load_task(task, self.config.seed, self.config.data_dir)
            self._runners[task] = TaskRunner(self.study_config, data, self.loaded, self.cache / "study", self.progress)
        return self._runners[task]

    def expert(self, task: str, layer_types: str, ffn_rate: float, head_rate: float):
        """A DoE expert of the adapted model: pruned, metric before, recovered, metric after."""
        from .. import adapt, attribution, prune

        runner = self.runner(task)
        stats = runner.stats(self.config.calib_examples)
        model = copy.deepcopy(runner.adapted)
        scorer = attribution.make_scorer("doe")
        ffn = scorer.score(model, stats).importance
        heads = scorer.score_heads(model, stats) if layer_types != "ffn" else None
        report = prune.prune_model(model, layer_types, prune.PruneConfig(ffn_rate if layer_types != "attention" else 0.0),
                                   ffn, heads, head_rate)
        before = runner.evaluate(model)[runner.data.metric]
        cfg = adapt.TrainConfig(runner.recovery_mode, 1, None, self.study_config.batch_size, self.config.seed + 1)
        adapt.train(model, runner.tokenizer, runner.recovery, None, runner.data.metric, cfg,
                    f"[{task}] recovery {layer_types}", self.progress)
        return model, report, before, runner.evaluate(model)[runner.data.metric]

    def export(self, model, name: str, fuse: bool) -> tuple[Path, dict]:
        """Export (and optionally fuse) ``model``; validated against PyTorch after every rewrite."""
        from ..export import export_onnx, fuse_for_ort, validate_onnx

        (sample, sample_mask), batches = common.random_check_batches(self.shape["vocab"], self.config.seed, low=1000)
        path = self.work / f"{name}.onnx"
        export_onnx(model, path, sample, sample_mask)
        report = {"plain": validate_onnx(model, path, batches)["max_abs_diff"]}
        if fuse:
            fused = self.work / f"{name}.fused.onnx"
            report["fusions"] = fuse_for_ort(path, fused)
            report["fused"] = validate_onnx(model, fused, batches)["max_abs_diff"]
            path = fused
        return path, report

    def onnx_metric(self, task: str, path: Path) -> float:
        from .. import evaluate

        runner = self.runner(task)
        sess = common.session(path, max(1, os.cpu_count() or 1))
        logits = evaluate.onnx_logits(sess, runner.tokenizer, runner.test.inputs)
        return evaluate.metric_value(runner.data.metric, runner.test.labels, logits.argmax(1).tolist())


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the weights (activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def header(config: SuiteConfig, suite: str, shape: dict) -> dict:
    import onnxruntime as ort

    head = common.environment([config.threads], ort.get_available_providers())
    head.update(suite=suite, config=asdict(config), model_shape=shape)
    return head


def time_sessions(paths: dict[str, Path], feeds: dict, config: SuiteConfig, extra: dict | None = None) -> dict:
    """Interleaved timing of sessions (and other callables in ``extra``) on the same feeds."""
    sessions = {name: common.session(path, config.threads) for name, path in paths.items()}
    runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    runners.update(extra or {})
    return common.paired_timing(runners, config.repeats, warmup=1, min_seconds=config.min_seconds)


# ----------------------------------------------------------------------------- layers


def matched_rates(shape: dict, budget: float, max_rate: float) -> dict[str, tuple[float, float]]:
    """(FFN rate, head rate) per layer type that removes ``budget`` of the FFN + attention weights."""
    ffn = 2 * shape["hidden"] * shape["ffn"]
    attention = 4 * shape["hidden"] * shape["hidden"]
    total = ffn + attention
    out = {"both": (budget, budget)}
    if budget * total / ffn < max_rate:
        out["ffn"] = (budget * total / ffn, 0.0)
    if budget * total / attention < max_rate:
        out["attention"] = (0.0, budget * total / attention)
    return {k: out[k] for k in ("ffn", "attention", "both") if k in out}


def run_layers(config: SuiteConfig, bench: Workbench) -> list[dict]:
    shape = bench.shape
    feeds = random_feeds(shape["vocab"], config.batch, config.tokens, config.seed)
    seq = config.tokens + config.prompt_length
    records = []
    for task in config.layer_tasks:
        runner = bench.runner(task)
        dense_value = runner.evaluate(runner.adapted)[runner.data.metric]
        dense_path, _ = bench.export(runner.adapted, f"{task}-dense", fuse=True)
        records.append({"kind": "dense", "task": task, "metric": runner.data.metric, "value": dense_value,
                        "split": runner.test.name, "split_size": len(runner.test),
                        "majority": _majority(runner)})
        for budget in config.budgets:
            for layer_types, (ffn_rate, head_rate) in matched_rates(shape, budget, config.max_rate).items():
                model, report, before, after = bench.expert(task, layer_types, ffn_rate, head_rate)
                path, checks = bench.export(model, f"{task}-{layer_types}-{budget:g}", fuse=True)
                times = time_sessions({"dense": dense_path, "expert": path}, feeds, config)
                speedup = common.quantiles(common.ratios(times, "dense", "expert"))
                bound = common.model_bound(shape["hidden"], report["ffn_widths_before"], report["head_counts_before"],
                                           report["ffn_widths"], report["head_counts"], seq)
                records.append({
                    "kind": "layers", "task": task, "layer_types": layer_types, "budget": budget,
                    "ffn_rate": ffn_rate, "head_rate": head_rate, "metric": runner.data.metric,
                    "dense_value": dense_value, "value_before_recovery": before, "value": after,
                    "params_before": report["params_before"], "params_after": report["params_after"],
                    "ffn_widths": report["ffn_widths"], "head_counts": report["head_counts"],
                    "batch": config.batch, "tokens": config.tokens, "sequence": seq, "repeats": len(times["dense"]),
                    "dense_latency_s": common.quantiles(times["dense"]),
                    "expert_latency_s": common.quantiles(times["expert"]),
                    "speedup": speedup, "bound": bound, "share_of_bound": speedup["median"] / bound,
                    "max_abs_diff": checks,
                })
                log(f"[layers] {task} {layer_types} budget {budget:g} (FFN {ffn_rate:.2f}, heads {head_rate:.2f}): "
                    f"{100 * dense_value:.1f} -> {100 * after:.1f} ({100 * before:.1f} before recovery); "
                    f"x{speedup['median']:.2f} (bound x{bound:.2f})")
    return records


def _majority(runner) -> float:
    from ..study import majority_baseline

    return majority_baseline(runner.data, runner.config)["value"]


# ----------------------------------------------------------------------------- peers


def run_peers(config: SuiteConfig, bench: Workbench) -> list[dict]:
    import torch

    task = config.peers_task
    runner = bench.runner(task)
    shape = bench.shape
    metric = runner.data.metric
    dense = runner.adapted
    dense_value = runner.evaluate(dense)[metric]
    paths, values, notes = {}, {}, {}
    paths["onnx dense"], _ = bench.export(dense, f"peers-{task}-dense", fuse=False)
    paths["onnx dense fused"], _ = bench.export(dense, f"peers-{task}-dense", fuse=True)
    ffn_model, _, _, ffn_value = bench.expert(task, "ffn", config.ffn_rate, 0.0)
    paths["onnx expert"], _ = bench.export(ffn_model, f"peers-{task}-ffn", fuse=False)
    paths["onnx expert fused"], _ = bench.export(ffn_model, f"peers-{task}-ffn", fuse=True)
    paths["onnx expert fused int8"] = bench.work / f"peers-{task}-ffn.fused.int8.onnx"
    quantize_int8(paths["onnx expert fused"], paths["onnx expert fused int8"])
    both_model, both_report, _, both_value = bench.expert(task, "both", *config.both_rates)
    paths["onnx both fused"], _ = bench.export(both_model, f"peers-{task}-both", fuse=True)
    paths["onnx both fused int8"] = bench.work / f"peers-{task}-both.fused.int8.onnx"
    quantize_int8(paths["onnx both fused"], paths["onnx both fused int8"])
    for name, path in paths.items():
        values[name] = bench.onnx_metric(task, path)
    notes["onnx expert"] = f"FFN p={config.ffn_rate:g}; PyTorch metric {100 * ffn_value:.1f}"
    notes["onnx both fused"] = (f"FFN p={config.both_rates[0]:g} + heads p={config.both_rates[1]:g} "
                                f"(heads {both_report['head_counts']}); PyTorch metric {100 * both_value:.1f}")

    feeds = random_feeds(shape["vocab"], config.batch, config.tokens, config.seed)
    extra_sessions = {}
    if config.optimum_python:
        optimum_path, optimum_version = export_with_optimum(config.optimum_python, bench.loaded.path,
                                                            bench.work / "optimum", len(runner.data.labels))
        optimum_session = common.session(optimum_path, config.threads)
        optimum_feeds = {i.name: (feeds[i.name] if i.name in feeds else np.zeros_like(feeds["input_ids"]))
                         for i in optimum_session.get_inputs()}
        extra_sessions["optimum-cli dense (base model, own head)"] = (
            lambda: optimum_session.run(None, optimum_feeds))
        notes["optimum-cli dense (base model, own head)"] = (
            f"optimum-onnx {optimum_version}, exported in a separate environment from the base model with its "
            f"untrained classification head and no soft prompt ({config.prompt_length} fewer positions): a speed "
            "peer only, no task metric")
        values["optimum-cli dense (base model, own head)"] = None
    torch_ids, torch_mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        def eager():
            with torch.inference_mode():
                dense(torch_ids, torch_mask)

        times = time_sessions(paths, feeds, config, extra={"pytorch eager dense": eager, **extra_sessions})
    finally:
        torch.set_num_threads(threads)
    values["pytorch eager dense"] = dense_value
    records = []
    base = "pytorch eager dense"
    for name in [base] + list(paths) + list(extra_sessions):
        speedup = common.quantiles(common.ratios(times, base, name))
        over_onnx = common.quantiles(common.ratios(times, "onnx dense", name))
        records.append({"kind": "peer", "task": task, "peer": name, "metric": metric, "value": values[name],
                        "metric_split": runner.test.name, "metric_split_size": len(runner.test),
                        "batch": config.batch, "tokens": config.tokens, "repeats": len(times[name]),
                        "latency_s": common.quantiles(times[name]), "speedup_vs_eager": speedup,
                        "speedup_vs_onnx_dense": over_onnx, "note": notes.get(name, "")})
        shown = "n/a" if values[name] is None else f"{100 * values[name]:.1f}"
        log(f"[peers] {name}: {metric} {shown}, x{speedup['median']:.2f} vs eager, "
            f"x{over_onnx['median']:.2f} vs ONNX dense")
    return records


def export_with_optimum(python: str, model_dir: str, out: Path, num_labels: int) -> tuple[Path, str]:
    """Run ``optimum-cli export onnx`` in another Python environment; return the graph and the version."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('optimum-onnx'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise ValueError(f"--optimum-python {python}: optimum-onnx is not importable there "
                         f"({(probe.stderr.strip().splitlines() or ['no output'])[-1][-300:]}); "
                         "create that environment with: python -m venv ENV && ENV/bin/pip install torch==2.13.0 "
                         "optimum-onnx onnx onnxruntime 'transformers<4.58'")
    command = [python, "-m", "optimum.exporters.onnx", "--model", str(model_dir), "--task", "text-classification",
               str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    path = out / "model.onnx"
    if done.returncode != 0 or not path.is_file():
        raise ValueError(f"optimum export failed ({' '.join(command)}): {done.stderr.strip()[-1000:]}")
    return path, probe.stdout.strip()


# ----------------------------------------------------------------------------- switch + e2e


def make_bundles(config: SuiteConfig, root: Path, count: int, progress: bool) -> list[str]:
    """One real expert bundle (``doe build`` on generated data; the weights' values do not change
    the cost measured here), copied under ``count`` task names."""
    from ..loading import LoadedModel, load_model, tiny_model
    from ..pipeline import BuildConfig, build_task
    from ..tasks import synthetic_task

    loaded = tiny_model(config.seed) if config.tiny else load_model(config.model)
    loaded = LoadedModel(loaded.backbone, loaded.hf_tokenizer, loaded.name, loaded.path, loaded.weights_sha256)
    build_cfg = BuildConfig(out_dir=str(root), epochs=0, recovery_epochs=0, calib_examples=16, max_eval=32,
                            max_length=config.tokens, prompt_length=config.prompt_length, rate=config.ffn_rate,
                            progress=progress, fuse=True)
    result = build_task(build_cfg, loaded, synthetic_task("expert-0"))
    names = ["expert-0"]
    source = Path(result.bundle)
    for index in range(1, count):
        name = f"expert-{index}"
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["task"]["name"] = name
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
        names.append(name)
    return names


def long_texts(count: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocabulary = ("market film team minister growth season album court bank player music election profit "
                  "shares league court police phone software director economy award").split()
    return [" ".join(rng.choice(vocabulary, size=words)) for _ in range(count)]


def mixed_texts(count: int, seed: int, max_words: int = 160) -> list[str]:
    """Request texts of realistic, mixed lengths (log-uniform 3..max_words words)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(3), np.log(max_words), size=count)).astype(int)
    pool = long_texts(1, max_words, seed)[0].split()
    return [" ".join(pool[:n]) for n in lengths]


def run_switch(config: SuiteConfig, root: Path, progress: bool) -> list[dict]:
    from doe_runtime import Router
    from doe_runtime.router import Expert, encode_batch

    names = make_bundles(config, root, max(config.switch_tasks), progress)
    records = []
    # cold load: sha256 checks + session creation + first run, and resident memory per expert
    router = Router(root, device="cpu", max_resident=len(names), intra_op_threads=config.threads)
    short = ["a short request about the market"]
    loads, rss = [], [rss_bytes()]
    for name in names:
        t0 = time.perf_counter()
        router.predict(name, short)
        loads.append(time.perf_counter() - t0)
        rss.append(rss_bytes())
    growth = [b - a for a, b in zip(rss, rss[1:])]
    records.append({"kind": "load", "experts": len(names), "cold_load_s": common.quantiles(loads),
                    "first_load_s": loads[0], "rss_growth_bytes": growth,
                    "rss_per_expert_bytes": float(np.median(growth[1:] if len(growth) > 1 else growth)),
                    "model_bytes": (root / names[0] / "model.onnx").stat().st_size})
    log(f"[switch] cold load median {1e3 * np.median(loads):.1f} ms; resident memory per expert "
        f"{np.median(growth[1:] if len(growth) > 1 else growth) / 2**20:.1f} MiB")
    for items, words in ((1, 6), (config.batch, 400)):
        texts = short if items == 1 else long_texts(items, words, config.seed)
        for count in config.switch_tasks:
            tasks = names[:count]

            def single(tasks=tasks, texts=texts):
                for _ in range(config.switch_requests):
                    router.predict(tasks[0], texts)

            def rotate(tasks=tasks, texts=texts):
                for index in range(config.switch_requests):
                    router.predict(tasks[index % len(tasks)], texts)

            times = common.paired_timing({"one task": single, "round-robin": rotate}, config.repeats, warmup=1,
                                         min_seconds=config.min_seconds)
            per_request = [(r - s) / config.switch_requests for s, r in zip(times["one task"], times["round-robin"])]
            records.append({"kind": "switch", "tasks": count, "items": items, "requests": config.switch_requests,
                            "one_task_s_per_request": common.quantiles([t / config.switch_requests for t in times["one task"]]),
                            "round_robin_s_per_request": common.quantiles([t / config.switch_requests for t in times["round-robin"]]),
                            "added_s_per_request": common.quantiles(per_request), "repeats": len(per_request)})
            log(f"[switch] {count} tasks, {items} item(s)/request: round-robin adds "
                f"{1e3 * np.median(per_request):+.3f} ms per request")
    # router overhead at batch x tokens: bare session.run vs tokenize + run vs Router.predict
    texts = long_texts(config.batch, 400, config.seed)
    expert = Expert(root / names[0], "cpu", router._session_options())
    ids, mask = encode_batch(expert.tokenizer, texts)
    feeds = {"input_ids": ids, "attention_mask": mask}
    runners = {
        "session.run": lambda: expert.session.run(None, feeds),
        "tokenize + session.run": lambda: expert.session.run(None, dict(zip(("input_ids", "attention_mask"),
                                                                           encode_batch(expert.tokenizer, texts)))),
        "Router.predict": lambda: router.predict(names[0], texts),
    }
    times = common.paired_timing(runners, max(config.repeats, 10), warmup=2, min_seconds=config.min_seconds)
    bare = np.asarray(times["session.run"])
    tokenized = np.asarray(times["tokenize + session.run"])
    routed = np.asarray(times["Router.predict"])
    records.append({"kind": "overhead", "batch": config.batch, "tokens": int(ids.shape[1]),
                    "session_run_s": common.quantiles(list(bare)),
                    "tokenize_run_s": common.quantiles(list(tokenized)),
                    "router_predict_s": common.quantiles(list(routed)),
                    "router_overhead_share": common.quantiles(list((routed - tokenized) / bare)),
                    "tokenization_share": common.quantiles(list((tokenized - bare) / bare)),
                    "repeats": len(bare)})
    log(f"[switch] Router.predict overhead over tokenize + session.run: "
        f"{100 * np.median((routed - tokenized) / bare):+.2f}% of session.run")
    return records


def run_e2e(config: SuiteConfig, root: Path) -> list[dict]:
    from doe_runtime import Router
    from doe_runtime.router import encode_batch, plan_batches

    task = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())[0]
    texts = mixed_texts(config.e2e_items, config.seed)
    routers = {sort: Router(root, device="cpu", batch_size=config.e2e_batch, intra_op_threads=config.threads,
                            sort_by_length=sort) for sort in (True, False)}
    expected = [p.label_id for p in routers[True].predict(task, texts)]
    same = [p.label_id for p in routers[False].predict(task, texts)] == expected
    tokenizer = routers[True]._expert(task).tokenizer
    _, mask = encode_batch(tokenizer, texts)
    lengths = mask.sum(axis=1)
    padded = {}
    for sort in (True, False):
        batches = plan_batches(lengths, config.e2e_batch, None, sort)
        padded[sort] = int(sum(len(b) * lengths[b].max() for b in batches))
    runners = {("sorted" if sort else "arrival order"): (lambda r=r: r.predict(task, texts)) for sort, r in routers.items()}
    times = common.paired_timing(runners, config.repeats, warmup=1, min_seconds=config.min_seconds)
    records = []
    for sort, name in ((True, "sorted"), (False, "arrival order")):
        records.append({"kind": "e2e", "order": name, "items": len(texts), "batch": config.e2e_batch,
                        "real_tokens": int(lengths.sum()), "padded_tokens": padded[sort],
                        "latency_s": common.quantiles(times[name]),
                        "items_per_s": len(texts) / float(np.median(times[name])),
                        "speedup_vs_arrival": common.quantiles(common.ratios(times, "arrival order", name)),
                        "same_labels": same, "repeats": len(times[name])})
        log(f"[e2e] {name}: {len(texts) / np.median(times[name]):.0f} items/s, padded tokens {padded[sort]} "
            f"for {int(lengths.sum())} real")
    return records


# ----------------------------------------------------------------------------- load


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def run_load(config: SuiteConfig, root: Path, progress: bool) -> list[dict]:
    """``doe-runtime serve`` in its own process, a bounded asyncio client with ``load_connections``
    concurrent connections over ``load_tasks`` tasks; every answer is compared with sequential
    ``Router.predict``; the server's resident memory is sampled every second."""
    import asyncio
    import subprocess

    import httpx

    from doe_runtime import Router

    names = make_bundles(config, root, config.load_tasks, progress)
    texts = mixed_texts(64, config.seed, max_words=120)
    requests = [(names[i % len(names)], texts[i: i + 1 + i % 4]) for i in range(len(texts) - 4)]
    reference = Router(root, device="cpu", max_resident=len(names))
    expected = [[p.label_id for p in reference.predict(task, items)] for task, items in requests]
    del reference
    port = _free_port()
    server_log = root / "server.log"
    log_handle = open(server_log, "w", encoding="utf-8")
    server = subprocess.Popen([sys.executable, "-m", "doe_runtime.cli", "serve", str(root), "--port", str(port),
                               "--max-resident", str(len(names)), "--threads", str(config.threads)]
                              + ([] if config.load_memory_arena else ["--no-memory-arena"]),
                              stdout=log_handle, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready: {server_log.read_text()[-2000:]}")
            time.sleep(0.2)
        result = asyncio.run(_load(base, server.pid, requests, expected, config))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log_handle.close()
    # uvicorn drains running requests on SIGTERM, logs the shutdown, then re-raises the signal
    result["graceful_shutdown"] = "Application shutdown complete" in server_log.read_text()
    result["exit_code"] = server.returncode
    log(f"[load] {result['requests']} requests, {result['errors']} errors, {result['mismatches']} mismatches, "
        f"{result['requests_per_s']:.1f} req/s, p50 {1e3 * result['latency_s']['p50']:.1f} ms, p99 "
        f"{1e3 * result['latency_s']['p99']:.1f} ms, memory growth {100 * result['rss_growth']:+.2f}%")
    return [result]


async def _load(base: str, pid: int, requests: list, expected: list, config: SuiteConfig) -> dict:
    import asyncio

    import httpx

    latencies, errors, mismatches, samples = [], [], 0, []
    measuring = asyncio.Event()
    stop = asyncio.Event()
    counter = {"next": 0}

    async def worker(client):
        nonlocal mismatches
        while not stop.is_set():
            index = counter["next"] % len(requests)
            counter["next"] += 1
            task, items = requests[index]
            t0 = time.perf_counter()
            try:
                response = await client.post(f"{base}/v1/tasks/{task}/predict", json={"inputs": items})
                ok = response.status_code == 200
                labels = [p["label_id"] for p in response.json()["predictions"]] if ok else None
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                ok, labels, response = False, None, f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - t0
            if measuring.is_set() and not stop.is_set():
                latencies.append(elapsed)
                if not ok:
                    errors.append(str(getattr(response, "status_code", response))[:200])
                elif labels != expected[index]:
                    mismatches += 1

    async def sampler():
        while not stop.is_set():
            samples.append((time.monotonic(), measuring.is_set(), _process_rss(pid)))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=config.load_connections, max_keepalive_connections=config.load_connections)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(config.load_connections)]
        tasks.append(asyncio.create_task(sampler()))
        await asyncio.sleep(config.load_warmup_seconds)
        measuring.set()
        start = time.monotonic()
        await asyncio.sleep(config.load_seconds)
        stop.set()
        elapsed = time.monotonic() - start
        await asyncio.gather(*tasks)
    rss = [r for _, during, r in samples if during] or [samples[-1][2]]
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")  # noqa: E731
    return {"kind": "load", "connections": config.load_connections, "memory_arena": config.load_memory_arena, "tasks": len({t for t, _ in requests}),
            "seconds": elapsed, "warmup_seconds": config.load_warmup_seconds, "requests": len(latencies),
            "errors": len(errors), "error_samples": errors[:5], "mismatches": mismatches,
            "requests_per_s": len(latencies) / elapsed,
            "latency_s": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1] if ordered else None},
            "rss_after_warmup_bytes": rss[0], "rss_end_bytes": rss[-1], "rss_max_bytes": max(rss),
            "rss_growth": (rss[-1] - rss[0]) / rss[0], "rss_samples": len(rss)}


# ----------------------------------------------------------------------------- driver + reports


def run(suite: str, config: SuiteConfig, out_dir: Path, work: Path, cache: Path, progress: bool = True) -> list[Path]:
    """Run one suite (not grid) and write its records and report; return the written paths."""
    out_dir = Path(out_dir)
    work = Path(work)
    written = []
    if suite in ("layers", "peers"):
        bench = Workbench(config, cache, work / "graphs", progress)
        records = run_layers(config, bench) if suite == "layers" else run_peers(config, bench)
        shape = bench.shape
    else:
        root = work / "bundles"
        root.mkdir(parents=True, exist_ok=True)
        if suite == "switch":
            records = run_switch(config, root, progress)
        elif suite == "load":
            records = run_load(config, work / "load-bundles", progress)
        else:
            records = run_e2e(config, _ensure(config, root, progress))
        shape = {}
    path = out_dir / f"{suite}.jsonl"
    common.write_jsonl(path, [header(config, suite, shape)] + records)
    written += [path, render(path, out_dir)]
    return written


def _ensure(config: SuiteConfig, root: Path, progress: bool) -> Path:
    if not any((p / "manifest.json").is_file() for p in root.iterdir()):
        make_bundles(config, root, 1, progress)
    return root


def render(records_path: Path, out_dir: Path) -> Path:
    records = common.read_jsonl(records_path)
    head, rows = records[0], records[1:]
    suite = head["suite"]
    cfg = head["config"]
    model = "tiny random BERT" if cfg["tiny"] else f"`{cfg['model']}`"
    intro = [f"Model {model}; CPU {head['cpu']} ({head['cores']} cores), {cfg['threads']} intra-op thread(s); "
             f"onnxruntime {head['versions'].get('onnxruntime')}, torch {head['versions'].get('torch')}. "
             f"Recorded {head['created']}. Ratios are medians of per-repeat ratios of interleaved runs on the same "
             "inputs; [p25, p75] in brackets.", ""]
    lines = {"layers": _render_layers, "peers": _render_peers, "switch": _render_switch, "e2e": _render_e2e,
             "load": _render_load}[suite](
        rows, cfg, intro, Path(out_dir))
    path = Path(out_dir) / f"{suite}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _q(q: dict, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(q['median'] * scale)} [{fmt.format(q['p25'] * scale)}, {fmt.format(q['p75'] * scale)}]"


def _render_layers(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Layer types: FFN neurons vs attention heads vs both, at matched parameter budgets", ""] + intro
    lines += [f"DoE scores on {cfg['calib_examples']} calibration examples of the {cfg['adapt']}-adapted model, "
              f"1 recovery epoch on {cfg['recovery_examples']} examples; graphs with onnxruntime fusions (validated "
              f"against PyTorch after every rewrite); speed at batch {cfg['batch']} x {cfg['tokens']} tokens (+ "
              f"{cfg['prompt_length']} prompt). Budget = share of the FFN + attention projection weights removed; "
              "the bound is the FLOP bound of each expert's own widths and head counts.", ""]
    dense = {r["task"]: r for r in rows if r["kind"] == "dense"}
    data = [r for r in rows if r["kind"] == "layers"]
    for task, d in dense.items():
        lines += [f"## {task}: {d['metric']} on {d['split']} (n={d['split_size']}); dense {100 * d['value']:.1f}, "
                  f"majority label {100 * d['majority']:.1f}", "",
                  "| budget | layer types | FFN rate | head rate | heads kept | params (M) | metric (before recovery) "
                  "| speed-up | bound | share |", "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in data if r["task"] == task), key=lambda r: (r["budget"], r["layer_types"])):
            lines.append(f"| {r['budget']:g} | {r['layer_types']} | {r['ffn_rate']:.2f} | {r['head_rate']:.2f} | "
                         f"{','.join(map(str, r['head_counts']))} | {r['params_before'] / 1e6:.1f} -> "
                         f"{r['params_after'] / 1e6:.1f} | {100 * r['value']:.1f} ({100 * r['value_before_recovery']:.1f})"
                         f" | x{_q(r['speedup'])} | x{r['bound']:.2f} | {r['share_of_bound']:.0%} |")
        lines.append("")
    plot = _plot_layers(data, dense, out_dir)
    if plot:
        lines += [f"![layer types]({plot.name})", ""]
    return lines


def _plot_layers(data, dense, out_dir) -> Path | None:
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dense)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    colors = {"ffn": "tab:blue", "attention": "tab:orange", "both": "tab:green"}
    for col, task in enumerate(tasks):
        sub = [r for r in data if r["task"] == task]
        budgets = sorted({r["budget"] for r in sub})
        for offset, kind in enumerate(("ffn", "attention", "both")):
            sel = {r["budget"]: r for r in sub if r["layer_types"] == kind}
            xs = [i + (offset - 1) * 0.27 for i, b in enumerate(budgets) if b in sel]
            picked = [sel[b] for b in budgets if b in sel]
            axes[0][col].bar(xs, [r["speedup"]["median"] for r in picked], 0.25, color=colors[kind], label=kind)
            axes[0][col].scatter(xs, [r["bound"] for r in picked], marker="_", s=200, color="black")
            axes[1][col].bar(xs, [100 * r["value"] for r in picked], 0.25, color=colors[kind], label=kind)
        for row in (0, 1):
            axes[row][col].set_xticks(range(len(budgets)), [f"{b:g}" for b in budgets])
            axes[row][col].set_xlabel("budget (share of FFN + attention weights removed)")
        axes[0][col].set_ylabel("speed-up over dense (black: FLOP bound)")
        axes[1][col].axhline(100 * dense[task]["value"], color="black", linestyle="--", label="dense")
        axes[1][col].set_ylabel(f"{dense[task]['metric']} x100 after recovery")
        low = min([100 * r["value"] for r in sub] + [100 * dense[task]["value"]])
        axes[1][col].set_ylim(max(0, low - 5), None)
        axes[0][col].set_title(task)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "layers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _render_peers(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Peers: what users run today vs the experts, on the same inputs", ""] + intro
    if rows:
        r0 = rows[0]
        lines += [f"Task {r0['task']}: {r0['metric']} on {r0['metric_split']} (n={r0['metric_split_size']}), "
                  f"speed at batch {r0['batch']} x {r0['tokens']} tokens (+ prompt). "
                  + ("The optimum-cli row is the base model exported by optimum-onnx in a separate environment "
                     "(transformers < 4.58), run here through a plain onnxruntime session interleaved with the "
                     "others; `ORTModelForSequenceClassification` adds its own Python wrapper on top. "
                     if any(r["peer"].startswith("optimum") for r in rows) else
                     "The optimum-cli peer needs `--optimum-python` (a separate environment). ")
                  + "fp16 belongs to the GPU run.", "",
                  "| peer | metric x100 | latency ms | speed-up vs PyTorch eager | speed-up vs ONNX dense | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            value = "n/a" if r["value"] is None else f"{100 * r['value']:.1f}"
            lines.append(f"| {r['peer']} | {value} | {_q(r['latency_s'], 1e3)} | "
                         f"x{_q(r['speedup_vs_eager'])} | x{_q(r['speedup_vs_onnx_dense'])} | {r['note']} |")
        lines.append("")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["peer"] for r in rows]
        ax.barh(names, [r["speedup_vs_onnx_dense"]["median"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            label = "" if r["value"] is None else f"  {100 * r['value']:.1f}"
            ax.text(r["speedup_vs_onnx_dense"]["median"], i, label, va="center", fontsize=8)
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"speed-up over ONNX dense fp32 (label: {rows[0]['metric']} x100)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out_dir / "peers.png", dpi=100)
        plt.close(fig)
        lines += ["![peers](peers.png)", ""]
    return lines


def _render_switch(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Switch: the cost of unplugging one expert and plugging in another", ""] + intro
    lines += ["Bundles: one FFN expert (p = {:g}, fused graph) written by `doe build`, copied under several task "
              "names (separate sessions; the values of the weights do not change these costs).".format(cfg["ffn_rate"]), ""]
    for r in rows:
        if r["kind"] == "load":
            lines += [f"- Cold load (sha256 checks + session creation + first request), {r['experts']} experts: median "
                      f"{1e3 * r['cold_load_s']['median']:.1f} ms (first {1e3 * r['first_load_s']:.1f} ms).",
                      f"- Resident memory per expert: {r['rss_per_expert_bytes'] / 2**20:.1f} MiB "
                      f"(model file {r['model_bytes'] / 2**20:.1f} MiB).", ""]
    switch = [r for r in rows if r["kind"] == "switch"]
    if switch:
        lines += ["| tasks | items per request | one task ms/request | round-robin ms/request | added ms/request |",
                  "|---:|---:|---:|---:|---:|"]
        for r in switch:
            lines.append(f"| {r['tasks']} | {r['items']} | {_q(r['one_task_s_per_request'], 1e3, '{:.3f}')} | "
                         f"{_q(r['round_robin_s_per_request'], 1e3, '{:.3f}')} | "
                         f"{_q(r['added_s_per_request'], 1e3, '{:+.3f}')} |")
        lines.append("")
    for r in rows:
        if r["kind"] == "overhead":
            lines += [f"Router overhead at batch {r['batch']} x {r['tokens']} tokens: `session.run` "
                      f"{_q(r['session_run_s'], 1e3)} ms, tokenize + run {_q(r['tokenize_run_s'], 1e3)} ms, "
                      f"`Router.predict` {_q(r['router_predict_s'], 1e3)} ms. Router's own overhead (predict minus "
                      f"tokenize + run) = {100 * r['router_overhead_share']['median']:+.2f}% of `session.run` "
                      f"[{100 * r['router_overhead_share']['p25']:+.2f}, {100 * r['router_overhead_share']['p75']:+.2f}]; "
                      f"tokenization itself {100 * r['tokenization_share']['median']:.1f}%.", ""]
    return lines


def _render_e2e(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# End to end: `Router.predict` with tokenization, with and without length sorting", ""] + intro
    if rows:
        lines += [f"{rows[0]['items']} requests of mixed length (3 to 160 words, log-uniform), batch "
                  f"{rows[0]['batch']}; labels identical in both orders: {rows[0]['same_labels']}.", "",
                  "| order | items/s | latency ms | padded tokens (real tokens) | speed-up vs arrival order |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['order']} | {r['items_per_s']:.0f} | {_q(r['latency_s'], 1e3, '{:.1f}')} | "
                         f"{r['padded_tokens']} ({r['real_tokens']}) | x{_q(r['speedup_vs_arrival'])} |")
        lines.append("")
    return lines


def _render_load(rows, cfg, intro, out_dir) -> list[str]:
    lines = ["# Load: `doe-runtime serve` under concurrent requests", ""] + intro
    for r in rows:
        lines += [f"{r['connections']} concurrent connections (one asyncio client) on loopback, requests of 1-4 texts "
                  f"(mixed lengths) round-robin over {r['tasks']} tasks, {r['seconds']:.0f} s measured after "
                  f"{r['warmup_seconds']:.0f} s of warm-up; every answer compared with sequential `Router.predict`; "
                  f"onnxruntime CPU memory arena {'on' if r.get('memory_arena', True) else 'off'}.", "",
                  "| requests | errors | answers differing | requests/s | p50 ms | p90 ms | p99 ms | max ms | RSS after "
                  "warm-up → end (MiB) | growth |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {r['requests']} | {r['errors']} | {r['mismatches']} | {r['requests_per_s']:.1f} | "
                  f"{1e3 * r['latency_s']['p50']:.1f} | {1e3 * r['latency_s']['p90']:.1f} | "
                  f"{1e3 * r['latency_s']['p99']:.1f} | {1e3 * r['latency_s']['max']:.1f} | "
                  f"{r['rss_after_warmup_bytes'] / 2**20:.0f} → {r['rss_end_bytes'] / 2**20:.0f} | "
                  f"{100 * r['rss_growth']:+.2f}% |", "",
                  f"SIGTERM at the end: graceful shutdown logged: {r['graceful_shutdown']} (exit code "
                  f"{r['exit_code']}; uvicorn re-raises the signal after draining)."
                  + (f" Error samples: {r['error_samples']}" if r["errors"] else ""), ""]
    return lines
