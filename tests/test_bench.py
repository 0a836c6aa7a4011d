"""`doe bench --quick` runs the real suite code on a tiny model; records must be complete and
well-formed. No time is asserted (speed claims live in benchmark reports, not in tests)."""

from pathlib import Path

import pytest

from doe_export.bench import common, grid
from doe_export.cli import main
from doe_export.flops import flop_bound, model_bound
from doe_runtime.bundle import read_manifest


def _bench(suite: str, out, work, *extra: str) -> int:
    """``doe bench --suite SUITE --quick`` into ``out`` (records) and ``work`` (graphs, bundles)."""
    return main(
        ["bench", "--suite", suite, "--quick", "--out", str(out), "--work-dir", str(work), "--no-progress", *extra]
    )


def test_flop_bound_matches_design_example():
    # BERT-base, L=128: S(0.65) = 1.73 (design.md section 1)
    assert flop_bound(0.65, 768, 3072, 128) == pytest.approx(1.73, abs=0.005)
    assert flop_bound(0.0, 384, 1536, 64) == 1.0


def test_paired_timing_interleaves_and_rotates():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = common.paired_timing(runners, repeats=3, warmup=0)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in times.values())


def test_quick_grid_records_are_complete(tmp_path, capsys):
    out = tmp_path / "results"
    assert _bench("grid", out, tmp_path / "g") == 0
    records = common.read_jsonl(out / "grid.jsonl")
    header, rows = records[0], records[1:]
    assert header["kind"] == "environment" and header["suite"] == "grid"
    assert {"onnxruntime", "torch"} <= set(header["versions"]) and header["cpu"] and header["threads"] == [1]
    cells = {(r["threads"], r["batch"], r["tokens"], r["rate"]) for r in rows}
    assert cells == {(1, b, t, 0.5) for b in grid.QUICK["batches"] for t in grid.QUICK["tokens"]}
    for row in rows:
        assert row["kind"] == "grid" and row["repeats"] >= 2
        for key in ("dense_latency_s", "expert_latency_s", "speedup"):
            assert row[key]["p25"] <= row[key]["median"] <= row[key]["p75"]
            assert row[key]["median"] > 0
        assert row["bound"] > 1 and row["share_of_bound"] == pytest.approx(row["speedup"]["median"] / row["bound"])
        assert row["sequence"] == row["tokens"] + 4
    report = (out / "grid.md").read_text()
    assert "| 2 | 16 |" in report and "p=0.5" in report
    for plot in ("grid_speedup_vs_batch.png", "grid_speedup_vs_rate.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_grid(capsys, tmp_path):
    assert main(["bench", "--rates", "1.5", "--out", str(tmp_path)]) == 2
    assert "rates must be in (0, 1)" in capsys.readouterr().err
    assert main(["bench", "--batches", "x", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--render-only", "--out", str(tmp_path / "none")]) == 2


def test_quick_grid_with_fused_graphs(tmp_path):
    out = tmp_path / "fused"
    assert (
        main(["bench", "--quick", "--fused", "--out", str(out), "--work-dir", str(tmp_path / "g"), "--no-progress"])
        == 0
    )
    header = common.read_jsonl(out / "grid.jsonl")[0]
    assert header["config"]["fused"] is True
    assert (tmp_path / "g" / "dense.fused.onnx").is_file() and (tmp_path / "g" / "p0.5.fused.onnx").is_file()
    assert "onnxruntime fusions" in (out / "grid.md").read_text()


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_layers_and_peers_records_are_complete(tmp_path):
    from doe_export.bench import layers as layers_suite
    from doe_export.bench import suites

    out = tmp_path / "results"
    for suite in ("layers", "peers"):
        assert _bench(suite, out, tmp_path / "w", "--cache-dir", str(tmp_path / "cache")) == 0
    layers = common.read_jsonl(out / "layers.jsonl")
    assert layers[0]["suite"] == "layers" and layers[0]["model_shape"]["heads"] == 3
    rows = [r for r in layers[1:] if r["kind"] == "layers"]
    shape = layers[0]["model_shape"]
    for budget in suites.QUICK["budgets"]:
        assert {r["layer_types"] for r in rows if r["budget"] == budget} == set(
            layers_suite.matched_rates(shape, budget, 0.95)
        )
    for r in rows:
        assert 0 <= r["value"] <= 1 and 0 <= r["value_before_recovery"] <= 1
        assert r["speedup"]["p25"] <= r["speedup"]["median"] <= r["speedup"]["p75"] and r["bound"] > 1
        assert r["params_after"] < r["params_before"]
        assert (r["head_counts"] == [3, 3]) == (r["layer_types"] == "ffn")
        assert r["max_abs_diff"]["max_abs_diff"] <= 1e-4 and r["max_abs_diff"]["fusions"]  # fused graph, validated
    assert "| 0.3 | both |" in (out / "layers.md").read_text() and _png(out / "layers.png")

    peers = list(common.read_jsonl(out / "peers.jsonl")[1:])
    names = [r["peer"] for r in peers]
    assert names == [
        "pytorch eager dense",
        "onnx dense",
        "onnx dense fused",
        "onnx expert",
        "onnx expert fused",
        "onnx expert fused int8",
        "onnx both fused",
        "onnx both fused int8",
    ]
    by_name = {r["peer"]: r for r in peers}
    assert by_name["pytorch eager dense"]["speedup_vs_eager"]["median"] == 1.0
    assert by_name["onnx dense"]["speedup_vs_onnx_dense"]["median"] == 1.0
    assert all(0 <= r["value"] <= 1 and r["latency_s"]["median"] > 0 for r in peers)
    assert _png(out / "peers.png") and "onnx both fused int8" in (out / "peers.md").read_text()


def test_matched_rates_remove_the_same_parameters():
    from doe_export.bench import layers as suites

    shape = {"hidden": 384, "ffn": 1536}
    ffn, attention = 2 * 384 * 1536, 4 * 384 * 384
    for budget in (0.2, 0.3):
        rates = suites.matched_rates(shape, budget, 0.95)
        removed = {kind: f * ffn + h * attention for kind, (f, h) in rates.items()}
        assert all(v == pytest.approx(budget * (ffn + attention)) for v in removed.values())
    assert "attention" not in suites.matched_rates(shape, 0.43, 0.95)  # would need > 95 % of the heads
    assert model_bound(
        384, dense_ffn=[1536] * 2, dense_heads=[12] * 2, ffn=[538] * 2, heads=[12] * 2, tokens=148
    ) == pytest.approx(flop_bound(1 - 538 / 1536, 384, 1536, 148))


def test_quick_switch_and_e2e_records_are_complete(tmp_path):
    out = tmp_path / "results"
    for suite in ("switch", "e2e"):
        assert _bench(suite, out, tmp_path / "w") == 0
    switch = common.read_jsonl(out / "switch.jsonl")[1:]
    kinds = [r["kind"] for r in switch]
    assert kinds.count("load") == 1 and kinds.count("overhead") == 1 and kinds.count("switch") == 2
    load = next(r for r in switch if r["kind"] == "load")
    assert load["experts"] == 2 and load["cold_load_s"]["median"] > 0 and load["model_bytes"] > 0
    overhead = next(r for r in switch if r["kind"] == "overhead")
    assert overhead["session_run_s"]["median"] > 0 and "router_overhead_share" in overhead
    assert (tmp_path / "w" / "bundles" / "expert-1" / "manifest.json").is_file()
    e2e = common.read_jsonl(out / "e2e.jsonl")[1:]
    assert [r["order"] for r in e2e] == ["sorted", "arrival order"]
    assert all(r["same_labels"] for r in e2e)
    assert e2e[0]["padded_tokens"] <= e2e[1]["padded_tokens"] and e2e[0]["real_tokens"] == e2e[1]["real_tokens"]
    assert "Router overhead" in (out / "switch.md").read_text() and "items/s" in (out / "e2e.md").read_text()


def test_layers_suite_without_data_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DOE_DATA_DIR", raising=False)
    assert main(["bench", "--suite", "layers", "--out", str(tmp_path)]) == 2
    assert "need GLUE data: pass --data-dir" in capsys.readouterr().err


def test_quick_load_suite_serves_without_errors(tmp_path):
    """The real server process under the bounded client: counts are complete, answers match."""
    pytest.importorskip("fastapi")
    out = tmp_path / "results"
    assert _bench("load", out, tmp_path / "w") == 0
    record, big = common.read_jsonl(out / "load.jsonl")[1:]
    assert record["requests"] > 0 and record["errors"] == 0 and record["mismatches"] == 0
    assert record["latency_s"]["p50"] <= record["latency_s"]["p99"] <= record["latency_s"]["max"]
    # the server's own time (Server-Timing) of every answer is within the client's time of it
    assert record["server_s"]["p50"] > 0 and record["server_s"]["max"] <= record["latency_s"]["max"]
    assert record["graceful_shutdown"] is True and record["rss_samples"] >= 1
    assert record["health_probes"] >= 5 and record["health_s"]["max"] < 1e9  # every probe answered
    assert big["kind"] == "big_request" and big["status"] == 200 and big["bytes"] > 4_000_000
    report = (out / "load.md").read_text()
    assert "answers differing" in report and "/healthz p99" in report and "MiB lasting" in report


def test_quick_batching_suite_counts_and_compares_every_answer(tmp_path):
    """Batching off and on against the real server: answers compared, /metrics parsed and counted."""
    pytest.importorskip("prometheus_client")
    out = tmp_path / "results"
    assert _bench("batching", out, tmp_path / "w") == 0
    rows = common.read_jsonl(out / "batching.jsonl")[1:]
    runs = [r for r in rows if r["kind"] == "batching"]
    # one server per wait, rounds alternating between them, the order reversed every other round
    order = [(r["round"], r["batch_wait_ms"], r["connections"]) for r in runs]
    assert order == [(0, 0.0, 4), (0, 5.0, 4), (1, 5.0, 4), (1, 0.0, 4)]
    for run in runs:
        assert run["requests"] > 0 and run["errors"] == 0 and run["mismatches"] == 0
        # CPU over the measured window, both sides: the server did the work, the lean client little of it
        assert run["server_cpu_s"] > 0 and 0 < run["client_cpu_share"] < 0.5
        assert run["server_cpu_ms_per_request"] == pytest.approx(1e3 * run["server_cpu_s"] / run["requests"])
        # the server's request counter equals what the client got; the mid-run scrape parsed whole
        assert run["metrics_add_up"] and run["metrics_requests"] == run["client_answered"] > 0
        assert run["metrics_midway_families"] >= 10 and run["graceful_shutdown"] is True
        assert run["requests_per_call"] >= 1.0
    assert runs[0]["requests_per_call"] == runs[3]["requests_per_call"] == 1.0  # batching off: one request, one call
    (verdict,) = [r for r in rows if r["kind"] == "verdict"]
    each = [
        runs[1]["requests_per_s"] / runs[0]["requests_per_s"],
        runs[2]["requests_per_s"] / runs[3]["requests_per_s"],
    ]
    assert verdict["connections"] == 4 and verdict["rounds"] == 2 and verdict["throughput_ratios"] == each
    assert verdict["throughput_ratio"] == pytest.approx(sum(each) / 2)  # the median of two
    report = (out / "batching.md").read_text()
    assert "counted / answered" in report and "throughput ×" in report and "server CPU per request" in report
    assert (out / "batching.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batching_suite_options_are_checked(tmp_path, capsys):
    assert main(["bench", "--suite", "batching", "--batching-waits", "0,2000", "--out", str(tmp_path)]) == 2
    assert "--batching-waits must all be in [0, 1000]" in capsys.readouterr().err
    assert main(["bench", "--suite", "batching", "--batching-connections", "0", "--out", str(tmp_path)]) == 2
    assert "--batching-connections must all be >= 1" in capsys.readouterr().err
    assert main(["bench", "--suite", "batching", "--batching-rounds", "0", "--out", str(tmp_path)]) == 2
    assert "--batching-rounds must be >= 1, got 0" in capsys.readouterr().err
    missing = tmp_path / "empty"
    missing.mkdir()
    code = main(
        [
            "bench",
            "--suite",
            "batching",
            "--bundles",
            str(missing),
            "--out",
            str(tmp_path / "o"),
            "--work-dir",
            str(tmp_path / "w"),
            "--no-progress",
        ]
    )
    assert code == 2 and "no bundle of task 'bbc-news' there" in capsys.readouterr().err


def test_quick_gpu_suite_records_every_candidate_and_the_verdicts(tmp_path):
    """The gpu suite's code on the CPU provider: doe build's bundles (aligned widths, fused fp16 variant) through
    Router against PyTorch eager and the dense onnxruntime graphs, every cell recorded, the report rendered."""
    from doe_export.bench import gpu

    out = tmp_path / "results"
    assert _bench("gpu", out, tmp_path / "w") == 0
    records = common.read_jsonl(out / "gpu.jsonl")
    head, rows = records[0], [r for r in records[1:] if r["kind"] == "gpu"]
    assert head["suite"] == "gpu" and head["model_shape"]["random_weights"] is True
    cells = {(r["batch"], r["tokens"]) for r in rows}
    assert cells == {(1, 16), (1, 32), (4, 16), (4, 32)}
    for cell in cells:
        names = {r["candidate"] for r in rows if (r["batch"], r["tokens"]) == cell}
        assert names == {gpu.EAGER, *gpu.DENSE_ORT, *gpu.EXPERTS, gpu.NO_GRAPHS}
    for r in rows:
        assert r["latency_s"]["median"] > 0 and r["p99_s"] >= r["latency_s"]["p25"] and r["items_per_s"] > 0
        assert (r["bound"] is not None) == r["candidate"].startswith("expert") and r["best_ort_dense"] in gpu.DENSE_ORT
    served = head["model_shape"]["served_tiny"]["expert-ffn"]
    assert served["provider"] == "CPUExecutionProvider" and served["cuda_graphs"]["off"]
    bundle = read_manifest(tmp_path / "w" / "gpu-bundles" / "tiny-expert-both")
    fp16 = bundle.raw["onnx"]["variants"]["fp16"]
    assert fp16["recipe"].startswith("dynamo export") and fp16["form"]["fused_attention_layers"] == 2
    assert bundle.raw["pruning"]["alignment"] == {"ffn_multiple": 64, "head_multiple": 2}
    report = (out / "gpu.md").read_text()
    assert "vs PyTorch eager fp16" in report and "| 4 x 32 |" in report and _png(out / "gpu.png")


def test_the_gpu_suite_without_a_cuda_provider_says_what_is_missing(tmp_path, capsys):
    assert main(["bench", "--suite", "gpu", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the gpu suite needs onnxruntime's CUDAExecutionProvider" in err and "doe-runtime[gpu]" in err


def test_optimum_peer_without_optimum_says_how_to_get_it(tmp_path):
    import sys

    from doe_export.bench import peers as suites

    with pytest.raises(
        ValueError, match=r"optimum-onnx is not importable there.*pip install torch==2\.13\.0 optimum-onnx"
    ):
        suites.export_with_optimum(sys.executable, "unused", tmp_path, 2)


def test_peers_with_an_optimum_graph_records_speed_only(tmp_path, monkeypatch):
    """The optimum peer path (its graph is faked by our own dense export: no optimum here)."""
    from doe_export.bench import peers, suites

    def fake_export(python, model_dir, out, num_labels):
        return out.parent / "peers-toy-dense.torchscript.onnx", "test"

    monkeypatch.setattr(peers, "export_with_optimum", fake_export)
    from doe_export.bench.workbench import quick_flow

    config = suites.SuiteConfig(threads=1, optimum_python="unused", flow=quick_flow(), **suites.QUICK)
    suites.run("peers", config, out_dir=tmp_path / "out", work=tmp_path / "w", cache=tmp_path / "cache", progress=False)
    rows = common.read_jsonl(tmp_path / "out" / "peers.jsonl")[1:]
    optimum = [r for r in rows if r["peer"].startswith("optimum")]
    assert len(optimum) == 1 and optimum[0]["value"] is None and optimum[0]["latency_s"]["median"] > 0
    report = (tmp_path / "out" / "peers.md").read_text()
    assert "| n/a |" in report and "separate environment" in report


def test_quick_replace_records_are_complete(tmp_path):
    """The shipped bundle (doe build's own code) against the plain dense export, fp32 and int8."""
    out = tmp_path / "results"
    assert _bench("replace", out, tmp_path / "w", "--cache-dir", str(tmp_path / "cache")) == 0
    records = common.read_jsonl(out / "replace.jsonl")[1:]
    rows = [r for r in records if r["kind"] == "replace"]
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert len(rows) + len(skipped) == len(records) and all("tokens or more" in r["reason"] for r in skipped)
    candidates = {"expert (shipped)", "expert fp32", "expert int8 static", "plain dense fp32", "plain dense int8"}
    for condition, items in (("real", 1), ("real", 8)):
        cell = [r for r in rows if r["condition"] == condition and r["items"] == items and r["threads"] == 1]
        assert {r["candidate"] for r in cell} == candidates
    for r in rows:
        assert r["latency_s"]["median"] > 0 and r["p99_s"] >= r["latency_s"]["p25"] and 0 <= r["value"] <= 1
        assert set(r["speedup_vs"]) == {"plain dense fp32", "plain dense int8"}
        assert r["extra_positions"] == 0 and r["split_size"] == 24
        assert ("bound" in r) == r["candidate"].startswith("expert")
        interval = r["vs_dense"]  # served metric - dense PyTorch, paired over the same 24 items
        assert interval["value"] == pytest.approx(r["value"] - r["dense_pytorch"]) and interval["items"] == 24
        assert interval["low"] <= interval["value"] <= interval["high"]
        assert interval["within"]["verdict"] in ("met", "not resolved", "missed")
    by = {r["candidate"]: r for r in rows if r["condition"] == "real" and r["items"] == 8 and r["threads"] == 1}
    assert by["plain dense fp32"]["speedup_vs"]["plain dense fp32"]["median"] == 1.0
    assert by["plain dense int8"]["served_precision"] == "int8" and by["expert fp32"]["served_precision"] == "fp32"
    assert by["expert int8 static"]["served_precision"] == "int8 static QDQ"
    report = (out / "replace.md").read_text()
    assert "Verdict" in report and "plain dense int8" in report and _png(out / "replace.png")
    assert "95% interval [" in report and "within 1 point: " in report


def test_quick_memory_suite_shares_the_backbone(tmp_path):
    """Prompt-mode experts of one backbone: with sharing on, the second expert adds less than without."""
    out = tmp_path / "results"
    assert _bench("memory", out, tmp_path / "w") == 0
    rows = common.read_jsonl(out / "memory.jsonl")[1:]
    assert {(r["experts"], r["share_weights"]) for r in rows} == {(1, False), (1, True), (2, False), (2, True)}
    shared = next(r for r in rows if r["experts"] == 2 and r["share_weights"])
    plain = next(r for r in rows if r["experts"] == 2 and not r["share_weights"])
    assert shared["shared_bytes_last"] > 0 and plain["shared_bytes_last"] == 0
    assert plain["pool_tensors"] == 0 and shared["pool_tensors"] > 0
    assert "| 2 | on |" in (out / "memory.md").read_text()


def test_quick_load_suite_with_the_ray_engine(tmp_path):
    """The same client against `serve --engine ray` (1 replica) beside the FastAPI server."""
    pytest.importorskip("ray", reason="the [ray] extra is part of the README install")
    out = tmp_path / "results"
    assert _bench("load", out, tmp_path / "w", "--engine", "ray") == 0
    rows = [r for r in common.read_jsonl(out / "load.jsonl")[1:] if r["kind"] == "load"]
    assert [(r["engine"], r["replicas"]) for r in rows] == [("fastapi", None), ("ray", 1)]
    ray_row = rows[1]
    assert ray_row["requests"] > 0 and ray_row["errors"] == 0 and ray_row["mismatches"] == 0
    assert ray_row["rss_end_bytes"] > 0 and ray_row["health_probes"] >= 5
    assert "ray (1 replica(s)" in (out / "load.md").read_text()


def test_replace_builds_with_the_asked_rounding():
    """--replace-round-to reaches the build the suite ships (1: the unaligned widths; unset: doe build's own)."""
    from doe_export.bench.replace import _build_config
    from doe_export.bench.workbench import SuiteConfig
    from doe_export.specs import BuildConfig

    assert _build_config(SuiteConfig(), "bbc-news", Path("out"), False).prune == BuildConfig().prune
    unaligned = _build_config(SuiteConfig(replace_round_to=1), "bbc-news", Path("out"), False)
    assert unaligned.prune.round_to == 1 and unaligned.prune.rate == BuildConfig().prune.rate


def test_batching_report_names_the_texts_whose_label_moved_and_their_margins():
    from doe_export.bench.load_report import _differing

    margins = [0.5, 0.5, 0.5, 0.01, 0.9, 0.02]
    runs = [{"differing_requests": {"3": 2, "5": 1}}, {"differing_requests": {"3": 1}}, {}]
    (_, line) = _differing(runs, margins)
    assert "differed from `Router.predict` of the text alone: 4, from 2 of the 6 texts" in line
    assert "#3 (3 answers, margin 0.010), #5 (1 answer, margin 0.020)" in line
    assert "median over all texts 0.500" in line
    assert _differing([{"differing_requests": {}}], margins) == []  # none differed: nothing to say
