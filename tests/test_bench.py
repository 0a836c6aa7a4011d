"""`doe bench --quick` runs the real suite code on a tiny model; records must be complete and
well-formed. No time is asserted (speed claims live in benchmark reports, not in tests)."""

import pytest

from doe_export.bench import common, grid
from doe_export.cli import main


def test_flop_bound_matches_design_example():
    # BERT-base, L=128: S(0.65) = 1.73 (design.md section 1)
    assert common.flop_bound(0.65, 768, 3072, 128) == pytest.approx(1.73, abs=0.005)
    assert common.flop_bound(0.0, 384, 1536, 64) == 1.0


def test_paired_timing_interleaves_and_rotates():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = common.paired_timing(runners, repeats=3, warmup=0)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in times.values())


def test_quick_grid_records_are_complete(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", "--suite", "grid", "--quick", "--out", str(out), "--work-dir", str(tmp_path / "g"),
                 "--no-progress"]) == 0
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
    assert main(["bench", "--quick", "--fused", "--out", str(out), "--work-dir", str(tmp_path / "g"),
                 "--no-progress"]) == 0
    header = common.read_jsonl(out / "grid.jsonl")[0]
    assert header["config"]["fused"] is True
    assert (tmp_path / "g" / "dense.fused.onnx").is_file() and (tmp_path / "g" / "p0.5.fused.onnx").is_file()
    assert "onnxruntime fusions" in (out / "grid.md").read_text()
