"""`doe build` from the command line: a local model folder + a user task from CSV, and the
errors that must stop a build before any training starts."""

import json

import pytest

from doe_export.cli import main
from doe_export.tasks import synthetic_task
from doe_runtime import Router


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--tasks",
        "--data-dir",
        "--adapt",
        "--rate",
        "--scorer",
        "--rank",
        "--budget",
        "--max-train",
        "--max-length",
        "--seed",
        "--out",
        "--recovery-epochs",
        "--round-to",
        "--user-task",
        "--max-loss",
        "--search-rates",
        "--train-budget",
        "--distill",
        "--temperature",
        "--hidden-distill",
        "--augment",
        "--recovery-extra",
        "--recovery-extra-labels",
        "--recovery-extra-from",
        "--recovery-params",
        "--exporter",
        "--attention",
        "--no-int8",
    ):
        assert flag in text


def test_cli_defaults_are_the_specs_defaults(monkeypatch):
    """Every flag's default is its spec field's: no flags make exactly the default configs."""
    from doe_export.bench.grid import GridConfig
    from doe_export.bench.workbench import SuiteConfig
    from doe_export.cli import bench, build, build_parser, study
    from doe_export.cli.options import default
    from doe_export.specs import BuildConfig
    from doe_export.study import StudyConfig

    monkeypatch.delenv("DOE_DATA_DIR", raising=False)
    parser = build_parser()
    args = parser.parse_args(["build"])
    assert build.config_from_args(args) == BuildConfig()
    for dest, (part, name) in build.FIELDS.items():
        assert getattr(args, dest) == default(BuildConfig if part is None else build.SPECS[part], name), dest
    for dest, (part, name) in build.INVERTED.items():
        assert getattr(args, dest) is False and default(build.SPECS[part], name) is True, dest
    args = parser.parse_args(["bench"])
    assert bench.grid_config(args) == GridConfig() and bench.suite_config(args) == SuiteConfig()
    for dest, (cls, name) in bench.FIELDS.items():
        assert str(getattr(args, dest)) == str(default(cls, name)), dest
    args = parser.parse_args(["study", "localization"])
    assert study.study_config(args) == StudyConfig()
    flow = StudyConfig().flow
    for dest, (part, name) in study.FIELDS.items():
        expected = default(StudyConfig, name) if part is None else getattr(getattr(flow, part), name)
        assert getattr(args, dest) == expected, dest


def test_rank_flag_reaches_the_prune_spec_and_the_scorer():
    from doe_export.cli import build, build_parser
    from doe_export.scorers import accepted, make_scorer

    prune = build.config_from_args(build_parser().parse_args(["build", "--rank", "mean-abs"])).prune
    assert prune.rank == "mean-abs" and make_scorer(
        prune.scorer, **accepted(prune.scorer, prune.scorer_options())
    ).config()["rank_by"] == ("mean |h*g|")


def test_a_scorer_option_the_scorer_does_not_take_is_refused(capsys):
    assert main(["build", "--no-progress", "--scorer", "magnitude", "--token-agg", "max"]) == 2
    err = capsys.readouterr().err
    assert "scorer 'magnitude' takes no option token_agg (given max" in err and "drop --token-agg" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--rate", "1.5"], "pruning rate must be in [0, 1)"),
        (["--tasks", "Bad Name"], "invalid task name"),
        (
            ["--scorer", "psychic"],
            "unknown scorer 'psychic'; available: activation, doe, gradient, magnitude, random, skill, taylor",
        ),
        (["--distill", "1.5"], "distillation weight must be in [0, 1]"),
        (["--hidden-distill", "-0.5"], "hidden-state distillation weight must be a finite number >= 0, got -0.5"),
        (
            ["--augment", "-1"],
            "recovery augment (perturbed copies of each training text) must be an integer >= 0, got -1",
        ),
        (
            ["--recovery-extra", "-5"],
            "recovery extra_examples (training items past the adaptation's) must be an integer >= 0, got -5",
        ),
        (
            ["--tasks", "bbc-news", "--max-train", "none", "--recovery-extra", "100"],
            "task 'bbc-news': --recovery-extra 100 asks recovery for training items past the adaptation's",
        ),
        (["--recovery-extra-from", "snli"], "--recovery-extra asks for none: set --recovery-extra N"),
        (
            ["--recovery-extra", "10", "--recovery-extra-from", "snli", "--recovery-extra-labels", "gold"],
            "--recovery-extra-from snli: that task's labels are not this task's",
        ),
        (
            ["--tasks", "bbc-news", "--recovery-extra", "10", "--recovery-extra-from", "nope"],
            "unknown task 'nope'",
        ),
        (["--adapt", "prompt", "--prompt-length", "0"], "prompt tuning needs a prompt length >= 1"),
        (["--search-rates", "0.5,x"], "expected comma-separated floats"),
        (["--tasks", "sst2", "--data-dir", "/nonexistent/glue"], "/nonexistent/glue/SST-2: no such folder"),
        (["--json", "/nonexistent/dir/r.json"], "--json /nonexistent/dir/r.json: its folder does not exist"),
        (["--scorer", "random", "--token-agg", "max"], "scorer 'random' takes no option token_agg"),
        (["--scorer", "taylor", "--rank", "mean-abs"], "scorer 'taylor' takes no option rank"),
    ],
)
def test_bad_input_stops_before_training(args, message, capsys):
    assert main(["build", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_build_user_task_with_local_model_folder(tmp_path, tiny_backbone, hf_tokenizer, capsys):
    from transformers.utils import logging as hf_logging

    bars_before = hf_logging.is_progress_bar_enabled()
    model_dir = _model_folder(tmp_path, tiny_backbone, hf_tokenizer)
    data = synthetic_task(n_train=60)
    csv_path = tmp_path / "reviews.csv"
    rows = ["review,verdict"] + [
        f"{text},{'yes' if y else 'no'}" for text, y in zip(data.train.inputs, data.train.labels)
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "artifacts"
    code = main(
        [
            "build",
            "--model",
            str(model_dir),
            "--tasks",
            "reviews",
            "--out",
            str(out),
            "--no-progress",
            "--user-task",
            f"name=reviews,train={csv_path},text=review,label=verdict",
            "--epochs",
            "1",
            "--recovery-epochs",
            "0",
            "--calib-examples",
            "8",
            "--max-length",
            "24",
            "--prompt-length",
            "2",
            "--rate",
            "0.5",
            "--round-to",
            "4",
            "--json",
            str(tmp_path / "r.json"),
            "--fuse",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "reviews" in captured.out and "FFN widths" in captured.out
    assert "Loading weights" not in captured.err  # --no-progress hides transformers' own bar too
    assert hf_logging.is_progress_bar_enabled() == bars_before  # and puts it back for the rest of the process
    verdict = "Served expert within 1 point(s) of the dense model on test (95% interval): "
    assert verdict in captured.out  # then met / not resolved / missed, or no verdict where dense did not learn
    assert "reviews" in captured.out.split(verdict)[1].splitlines()[0]
    assert "Pruned less than the default p=0.65 to hold the budget or as asked: reviews p=0.5, FLOP bound x" in (
        captured.out
    )
    results = json.loads((tmp_path / "r.json").read_text())
    assert results[0]["ffn_widths"] == [20, 20]  # round(37 * 0.5) = 18 -> rounded up to a multiple of 4
    assert Router(out, device="cpu").predict("reviews", ["good movie"])[0].label in ("no", "yes")
    manifest = json.loads((out / "reviews" / "manifest.json").read_text())
    assert manifest["onnx"]["rewrites"]["ort_fusions"]  # --fuse applied, and the build's validation passed
    assert manifest["validation"]["max_abs_diff"] <= 1e-4
    assert not (out / "reviews" / "unfused.onnx").exists()


def _model_folder(tmp_path, tiny_backbone, hf_tokenizer):
    """A tiny BERT and its tokenizer saved as a local --model folder."""
    model_dir = tmp_path / "tiny-model"
    tiny_backbone("bert").save_pretrained(model_dir)
    hf_tokenizer.save_pretrained(model_dir)
    return model_dir


def _user_csv(path, data) -> str:
    path.write_text("t,y\n" + "".join(f"{text},{y}\n" for text, y in zip(data.train.inputs, data.train.labels)))
    return str(path)


def test_recovery_extra_from_another_task_reaches_recovery_and_the_manifest(tmp_path, tiny_backbone, hf_tokenizer):
    """``--recovery-extra N --recovery-extra-from TASK``: recovery trains on N of TASK's texts, labelled by the
    dense model (the default labels with the flag), and the manifest says so."""
    model_dir = _model_folder(tmp_path, tiny_backbone, hf_tokenizer)
    reviews = _user_csv(tmp_path / "reviews.csv", synthetic_task(n_train=60))
    more = _user_csv(tmp_path / "more.csv", synthetic_task("more", n_train=30, seed=4))
    out = tmp_path / "artifacts"
    code = main(
        [
            "build",
            "--model",
            str(model_dir),
            "--tasks",
            "reviews",
            "--out",
            str(out),
            "--no-progress",
            "--user-task",
            f"name=reviews,train={reviews},text=t,label=y",
            "--user-task",
            f"name=more,train={more},text=t,label=y",
            "--recovery-extra",
            "20",
            "--recovery-extra-from",
            "more",
            *("--epochs", "1", "--recovery-epochs", "1", "--calib-examples", "8", "--max-length", "24"),
            *("--rate", "0.5", "--round-to", "4", "--no-fp16", "--no-int8"),
        ]
    )
    assert code == 0
    recovery = json.loads((out / "reviews" / "manifest.json").read_text())["adaptation"]["recovery"]
    assert (recovery["extra_examples"], recovery["extra_labels"], recovery["extra_from"]) == (20, "dense", "more")


def test_recovery_extra_from_a_task_of_other_inputs_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from doe_export import pipeline

    reviews = _user_csv(tmp_path / "reviews.csv", synthetic_task(n_train=60))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,y\n" + "".join(f"text {i},other {i},{i % 2}\n" for i in range(40)))
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("nothing may load"))
    code = main(
        [
            "build",
            "--tasks",
            "reviews",
            "--no-progress",
            "--user-task",
            f"name=reviews,train={reviews},text=t,label=y",
            "--user-task",
            f"name=pairs,train={pairs},text=a,text_b=b,label=y",
            "--recovery-extra",
            "20",
            "--recovery-extra-from",
            "pairs",
        ]
    )
    assert code == 2
    assert "task 'reviews' reads single inputs and --recovery-extra-from pairs gives pair ones" in (
        capsys.readouterr().err
    )


def test_second_task_errors_stop_before_the_first_trains(tmp_path, tiny_backbone, hf_tokenizer, capsys, monkeypatch):
    from doe_export import adapt

    model_dir = _model_folder(tmp_path, tiny_backbone, hf_tokenizer)
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    big.write_text("t,y\n" + "".join(f"text {i},{i % 2}\n" for i in range(400)))
    small.write_text("t,y\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    monkeypatch.setattr(adapt, "train", lambda *a, **k: pytest.fail("nothing may train"))
    code = main(
        [
            "build",
            "--model",
            str(model_dir),
            "--tasks",
            "big,small",
            "--no-progress",
            "--calib-examples",
            "64",
            "--user-task",
            f"name=big,train={big},text=t,label=y",
            "--user-task",
            f"name=small,train={small},text=t,label=y",
        ]
    )
    assert code == 2
    assert "task 'small': --calib-examples 64 exceeds the" in capsys.readouterr().err


def test_sigterm_runs_cleanup_like_ctrl_c():
    """`doe` turns SIGTERM into SystemExit(143): finally blocks run (the bench suites stop their server
    processes there; without it a stopped `doe bench --suite load --engine ray` left a Ray cluster running)."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from doe_export.console import exit_on_sigterm\n"
        "assert exit_on_sigterm()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "finally:\n"
        "    print('cleaned up', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and done.stdout.strip() == "cleaned up", done.stderr
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["tasks"]) == 0
        assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL)  # main installed it
    finally:
        signal.signal(signal.SIGTERM, before)


def test_build_with_intermediate_training_records_it_in_the_manifest(tmp_path, tiny_backbone, hf_tokenizer, capsys):
    """`--intermediate rte` (GLUE layout under --data-dir) before a user task: the backbone trains on RTE
    first, and the bundle's manifest says on what, how many examples and how it went."""
    model_dir = _model_folder(tmp_path, tiny_backbone, hf_tokenizer)
    rte = tmp_path / "glue" / "RTE"
    rte.mkdir(parents=True)
    for split, n in (("train", 40), ("dev", 10)):
        rows = [f"{i}\tthe cat sat {i}\ta cat sat\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(n)]
        (rte / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    data = synthetic_task(n_train=40)
    csv_path = tmp_path / "reviews.csv"
    lines = [f"{text},{'yes' if y else 'no'}" for text, y in zip(data.train.inputs, data.train.labels)]
    csv_path.write_text("review,verdict\n" + "\n".join(lines) + "\n")
    out = tmp_path / "artifacts"
    args = ["build", "--model", str(model_dir), "--tasks", "reviews", "--out", str(out), "--no-progress"]
    args += [
        "--user-task",
        f"name=reviews,train={csv_path},text=review,label=verdict",
        "--data-dir",
        str(tmp_path / "glue"),
    ]
    args += ["--intermediate", "rte", "--intermediate-examples", "24", "--epochs", "1", "--recovery-epochs", "0"]
    args += ["--calib-examples", "8", "--max-length", "24", "--rate", "0.5", "--round-to", "4", "--no-fp16"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[reviews] intermediate training on rte: 24 examples, dev accuracy" in captured.err
    manifest = json.loads((out / "reviews" / "manifest.json").read_text())
    first = manifest["adaptation"]["train"]["intermediate"]
    assert first["task"] == "rte" and first["examples"] == 24 and first["labels"] == ["entailment", "not_entailment"]
    assert len(first["dev_metric"]) == 1 and first["seconds"] > 0
