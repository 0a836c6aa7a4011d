"""`doe-runtime` from a shell: predict, inspect, list, and errors that name the problem."""

import json

from doe_runtime import Router
from doe_runtime.cli import main


def test_predict_inspect_list(bundles, capsys, tmp_path):
    assert main(["predict", str(bundles), "--task", "toy-single", "good film", "bad plot"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    want = Router(bundles, device="cpu").predict("toy-single", ["good film", "bad plot"])
    assert [json.loads(line) for line in lines] == [p.to_dict() for p in want]
    assert "2 predictions on CPUExecutionProvider (int8" in captured.err
    requests = tmp_path / "req.jsonl"
    requests.write_text('{"text_a": "a", "text_b": "b"}\n["c", "d"]\n')
    assert main(["predict", str(bundles), "--task", "toy-pair", "--input", str(requests), "--pair", "e", "f"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["inspect", str(bundles / "toy-pair")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["task"] == "toy-pair" and summary["architecture"]["ffn_widths"] == [12]
    assert "files verified" in captured.err
    assert main(["inspect", str(bundles / "toy-pair"), "--full"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((bundles / "toy-pair" / "manifest.json").read_text())
    assert main(["list", str(bundles)]) == 0
    out = capsys.readouterr().out
    assert "toy-single\tsingle\t2 labels" in out and "precisions fp32,fp16,int8" in out


def test_errors_exit_2_and_name_the_problem(bundles, capsys):
    assert main(["predict", str(bundles), "--task", "toy-pair", "lonely text"]) == 2
    assert "takes text pairs" in capsys.readouterr().err
    assert main(["predict", str(bundles), "--task", "nope", "x"]) == 2
    assert "unknown task 'nope'; known tasks: toy-pair, toy-single" in capsys.readouterr().err
    with open(bundles / "toy-single" / "model.onnx", "ab") as handle:
        handle.write(b"x")
    assert main(["inspect", str(bundles / "toy-single")]) == 2
    assert "toy-single/model.onnx: sha256 mismatch" in capsys.readouterr().err


def test_list_reports_every_bundle_even_after_a_broken_one(bundles, capsys):
    (bundles / "a-broken").mkdir()
    (bundles / "a-broken" / "manifest.json").write_text("{}")
    assert main(["list", str(bundles)]) == 1  # sorted first, yet the others are listed
    captured = capsys.readouterr()
    assert "a-broken\tBROKEN\t" in captured.out and "toy-pair\tpair" in captured.out and "toy-single" in captured.out
    assert "1 bundle(s) cannot be read" in captured.err
