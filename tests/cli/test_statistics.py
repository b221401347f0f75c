"""``modelfuse statistics fisher|gram`` through the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelfuse.cli import main
from modelfuse.statistics import fisher_diagonal, gram_matrices, load

RUN = [
    sys.executable,
    "-c",
    "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))",
]

WORDS = "the a good bad movie film was is great awful plot acting boring fun".split()
TEXTS = [
    "the movie was good",
    "a bad film",
    "great plot",
    "the acting was awful",
    "boring film",
    "fun movie is fun",
    "the plot is bad",
    "good acting",
]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer("good film")["input_ids"] == [2, 7, 10, 3]  # words, not [UNK]
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    labels = ["positive", "negative", 1, 0, "negative", "positive", 0, 1]
    path.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in zip(TEXTS, labels)))
    return path


def _reference_batches(folder: Path, labels: list[int] | None):
    """Each text alone (no padding): an independent route to the same statistics."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder, attn_implementation="eager")
    batches = []
    for i, text in enumerate(TEXTS):
        enc = tokenizer(text, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"]}
        batches.append(inputs if labels is None else (inputs, torch.tensor([labels[i]])))
    return model, batches


def test_empirical_fisher_of_a_bert_classifier(bert_folder, data_file, tmp_path):
    out = tmp_path / "fisher.safetensors"
    code = main(
        [
            "statistics",
            "fisher",
            "--model",
            str(bert_folder),
            "--data",
            str(data_file),
            "--text-column",
            "sentence",
            "--label-column",
            "y",
            "--estimator",
            "empirical",
            "--batch-size",
            "3",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    stats = load(out)
    assert stats.kind == "fisher" and stats.estimator == "empirical" and stats.n_examples == 8
    labels = [1, 0, 1, 0, 0, 1, 0, 1]
    model, batches = _reference_batches(bert_folder, labels)
    assert set(stats) == set(model.state_dict()) - {"bert.embeddings.position_ids"}
    expected = fisher_diagonal(model, batches, kind="empirical")
    for name in expected:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-4, atol=1e-9)


def test_gram_of_a_bert_classifier_with_n_examples_and_csv(bert_folder, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text\n" + "\n".join(TEXTS) + "\n")
    out = tmp_path / "gram.safetensors"
    assert (
        main(
            [
                "statistics",
                "gram",
                "--model",
                str(bert_folder),
                "--data",
                str(data),
                "--n-examples",
                "5",
                "--quiet",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    stats = load(out)
    assert stats.kind == "gram" and stats.n_examples == 5
    model, batches = _reference_batches(bert_folder, None)
    # per text, positions are rows: G = sum over the 5 texts' tokens of x x^T / number of tokens
    expected = gram_matrices(model, batches[:5])
    # by default the backbone's linear layers only: the task head is not merged with RegMean
    assert set(stats) == set(expected) - {"classifier.weight"}
    assert all(name.startswith("bert.") for name in stats)
    for name in stats:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-4, atol=1e-6)
    pooler = stats["bert.pooler.dense.weight"].double().numpy()
    assert np.all(np.linalg.eigvalsh(pooler) > -1e-6)  # a Gram matrix is PSD
    every = tmp_path / "every.safetensors"
    argv = ["statistics", "gram", "--model", str(bert_folder), "--data", str(data)]
    assert main([*argv, "--n-examples", "5", "--layers", "all", "--quiet", "-o", str(every)]) == 0
    assert set(load(every)) == set(expected)
    torch.testing.assert_close(
        load(every)["classifier.weight"], expected["classifier.weight"], rtol=1e-4, atol=1e-6
    )


def test_factory_for_any_model_end_to_end_through_a_subprocess(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "    x = torch.randn(20, 3)\n"
        "    return model, [(x[:10], torch.zeros(10, dtype=torch.long)), (x[10:], torch.ones(10, dtype=torch.long))]\n"
    )
    out = tmp_path / "mlp.fisher.safetensors"
    done = subprocess.run(
        [*RUN, "statistics", "fisher", "--factory", "my_models:make", "-o", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "over 20 examples" in done.stdout
    assert "20/20" in done.stderr  # the progress bar counts examples
    sys.path.insert(0, str(tmp_path))
    try:
        import my_models  # type: ignore[import-not-found]

        model, batches = my_models.make()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_models", None)
    expected = fisher_diagonal(model, batches)
    stats = load(out)
    for name in expected:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["statistics", "hessian", "--factory", "m:f", "-o", "OUT"], "valid: fisher, gram"),
        (["statistics", "fisher", "-o", "OUT"], "give --model DIR and --data FILE"),
        (["statistics", "fisher", "--factory", "nodots", "-o", "OUT"], "package.module:function"),
        (
            ["statistics", "fisher", "--factory", "no_such_module_xyz:f", "-o", "OUT"],
            "cannot import module",
        ),
        (
            ["statistics", "fisher", "--estimator", "sampled", "--factory", "m:f", "-o", "OUT"],
            "exact, empirical",
        ),
        (
            ["statistics", "gram", "--model", "MODEL", "--data", "DATA", "-o", "OUT"],
            "no column 'text'",
        ),
        (
            [
                "statistics",
                "fisher",
                "--estimator",
                "empirical",
                "--model",
                "MODEL",
                "--data",
                "DATA",
                "--text-column",
                "sentence",
                "-o",
                "OUT",
            ],
            "no column 'label'",
        ),
        (
            ["statistics", "gram", "--model", "MODEL", "--data", "MISSING", "-o", "OUT"],
            "no such data file",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, bert_folder, data_file, tmp_path, capsys):
    replace = {
        "OUT": str(tmp_path / "out.safetensors"),
        "MODEL": str(bert_folder),
        "DATA": str(data_file),
        "MISSING": str(tmp_path / "missing.jsonl"),
    }
    code = main([replace.get(a, a) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("modelfuse: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"keep me")
    assert main(["statistics", "fisher", "--factory", "m:f", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "target, message",
    [
        ("DATA", "would replace --data"),
        ("MODEL/model.safetensors", "would replace the weights of --model"),
    ],
)
def test_overwrite_never_replaces_an_input(target, message, bert_folder, data_file, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bert_folder, model)
    (model / "sub").mkdir()
    data = tmp_path / "data.safetensors"  # a data file named like an output, to pass the suffix check
    data.write_bytes(Path(data_file).read_bytes())
    out = target.replace("DATA", str(data)).replace("MODEL", str(model))
    before = {p: p.read_bytes() for p in [*model.rglob("*"), data] if p.is_file()}
    code = main(
        ["statistics", "gram", "--model", str(model), "--data", str(data), "-o", out,
         "--overwrite"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert {p: p.read_bytes() for p in before} == before


def test_statistics_beside_the_model_weights_are_allowed(tmp_path):
    from modelfuse.cli.statistics import _replaced_input

    model = tmp_path / "model"
    model.mkdir()
    assert _replaced_input(model / "fisher.safetensors", model, None) is None
    assert _replaced_input(model / "sub" / "fisher.safetensors", model, None) is None
    assert _replaced_input(tmp_path, model, None) == f"--model {model}"  # holds the model
    assert _replaced_input(model, model, None) == f"--model {model}"
    assert _replaced_input(model / "model-00001-of-00002.safetensors", model, None) is not None


def test_a_failing_factory_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_factory.py").write_text("def make():\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.chdir(tmp_path)
    code = main(["statistics", "gram", "--factory", "broken_factory:make", "-o", "g.safetensors"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "modelfuse: error: --factory: calling broken_factory:make raised RuntimeError: no GPU here\n"
    )
    assert not (tmp_path / "g.safetensors").exists()


FACTORY = (
    "import torch\n"
    "def make():\n"
    "    torch.manual_seed(0)\n"
    "    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
    "    x = torch.randn(23, 3)\n"
    "    y = (x[:, 0] > 0).long()\n"
    "    return model, [(x[:10], y[:10]), (x[10:], y[10:])]\n"
)


def _same_statistics(one: Path, split: Path) -> None:
    whole, parts = load(one), load(split)
    assert (parts.kind, parts.estimator, parts.n_examples) == (
        whole.kind, whole.estimator, whole.n_examples
    )
    assert list(parts) == list(whole)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-8)


def test_workers_on_a_bert_gram_give_the_one_process_file(bert_folder, data_file, tmp_path):
    common = [
        "statistics", "gram", "--model", str(bert_folder), "--data", str(data_file),
        "--text-column", "sentence", "--batch-size", "3", "--quiet",
    ]
    assert main([*common, "-o", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--workers", "2", "-o", str(tmp_path / "two.safetensors")]) == 0
    _same_statistics(tmp_path / "one.safetensors", tmp_path / "two.safetensors")


def test_ray_address_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "parallel_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(
        ["statistics", "gram", "--factory", "parallel_models:make", "--ray-address", "auto",
         "-o", "g.safetensors"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "modelfuse: error: --ray-address: Ray is not installed; install it with "
        "pip install 'modelfuse[ray]', or use --workers N for local processes\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel_models.py"]


def test_ray_address_local_gives_the_one_process_file(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    (tmp_path / "parallel_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    common = [
        "statistics", "fisher", "--factory", "parallel_models:make", "--n-examples", "21",
        "--estimator", "empirical",
    ]
    assert main([*common, "--quiet", "-o", "one.safetensors"]) == 0
    capsys.readouterr()
    args = [*common, "--ray-address", "local", "--workers", "2", "-o", "ray.safetensors"]
    assert main(args) == 0
    assert not ray.is_initialized()  # the run started Ray and shut it down
    captured = capsys.readouterr()
    assert "over 21 examples" in captured.out
    assert "21/21" in captured.err and "on 2 shards" in captured.err
    assert "Traceback" not in captured.err and "warning" not in captured.err
    _same_statistics(tmp_path / "one.safetensors", tmp_path / "ray.safetensors")
    # independent reference: the empirical Fisher of the first 21 examples, in one call
    sys.path.insert(0, str(tmp_path))
    try:
        import parallel_models  # type: ignore[import-not-found]

        model, batches = parallel_models.make()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("parallel_models", None)
    x = torch.cat([b[0] for b in batches])[:21]
    y = torch.cat([b[1] for b in batches])[:21]
    expected = fisher_diagonal(model, [(x, y)], kind="empirical")
    stats = load(tmp_path / "ray.safetensors")
    for name in expected:
        torch.testing.assert_close(stats[name], expected[name], rtol=1e-5, atol=1e-8)


def test_ray_address_nothing_listens_on_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    (tmp_path / "parallel_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "parallel_models.py").stat().st_mtime_ns
    code = main(
        ["statistics", "gram", "--factory", "parallel_models:make", "--ray-address",
         "127.0.0.1:1", "-o", "g.safetensors"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        "modelfuse: error: --ray-address '127.0.0.1:1': nothing answers at 127.0.0.1:1 ("
    )
    assert err.count("\n") == 1 and "ray start --head" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel_models.py"]
    assert (tmp_path / "parallel_models.py").stat().st_mtime_ns == before
