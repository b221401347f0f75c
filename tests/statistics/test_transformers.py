"""Statistics of Hugging Face sequence classifiers on padded batches of text.

The references are written out independently: each text run alone (no
padding at all) with a per-example ``torch.autograd.grad`` loop for the
Fisher, and the stacked inputs of every linear layer with ``X^T X / n`` in
numpy for the Gram matrices.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from modelfuse.errors import CheckpointError, ConfigError, DataError
from modelfuse.statistics import fisher_diagonal, gram_matrices, load
from modelfuse.statistics.gram import gram_passes, linear_layers, write_gram_matrices
from modelfuse.statistics.huggingface import backbone_name, load_sequence_classifier
from modelfuse.statistics.padding import padding_mask, unpadded
from modelfuse.statistics.storage import StatisticsWriter

transformers = pytest.importorskip("transformers")

WORDS = "the a good bad movie film was is great awful plot acting boring fun very".split()
TEXTS = [
    "the movie was very good",
    "bad film",
    "great plot",
    "the acting was awful and boring",  # 'and' is unknown: [UNK]
    "fun",
    "a very very boring film",
]
LABELS = [1, 0, 1, 0, 1, 0]


def _tokenizer():
    # (BertTokenizerFast(vocab_file=...) gives a vocabulary of the special tokens only in
    # transformers 5: every word would be [UNK])
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer("good film")["input_ids"] == [2, 7, 10, 3]
    return tokenizer


def _config(num_labels: int = 3):
    return transformers.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.3,  # evaluation mode must switch it off
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def classifier():
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config()).eval()
    return model, tokenizer


def _alone(tokenizer, text: str) -> dict[str, torch.Tensor]:
    return dict(tokenizer(text, return_tensors="pt"))


def _loop_fisher(model, tokenizer, kind: str) -> dict[str, torch.Tensor]:
    """Per text alone, per class: weighted squared gradients of log p (the formula)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sums = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    for text, label in zip(TEXTS, LABELS):
        logp = torch.log_softmax(model(**_alone(tokenizer, text)).logits, -1)[0]
        classes = range(logp.shape[0]) if kind == "exact" else [label]
        for c in classes:
            weight = float(logp[c].detach().exp()) if kind == "exact" else 1.0
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for n, g in zip(names, grads):
                sums[n].add_(g.square(), alpha=weight)
    return {n: s / len(TEXTS) for n, s in sums.items()}


@pytest.mark.parametrize(("kind", "side"), [("exact", "right"), ("empirical", "left")])
def test_padded_fisher_equals_each_text_alone(classifier, kind, side):
    model, tokenizer = classifier
    tokenizer.padding_side = side
    try:
        batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = "right"
    assert int((batch["attention_mask"] == 0).sum()) > 10  # really padded
    fisher = fisher_diagonal(model, [(batch, torch.tensor(LABELS))], kind=kind)
    with torch.enable_grad():
        expected = _loop_fisher(model, tokenizer, kind)
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-10)
    assert model.training is False and fisher.n_examples == len(TEXTS)


def _rows_of_each_text(model, tokenizer) -> dict[str, list[np.ndarray]]:
    rows: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(module, args, output, name=name):
                x = args[0].detach().double().numpy()
                rows.setdefault(f"{name}.weight", []).append(x.reshape(-1, x.shape[-1]))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for text in TEXTS:
                model(**_alone(tokenizer, text))
    finally:
        for handle in handles:
            handle.remove()
    return rows


def test_padded_gram_has_the_rows_of_real_tokens_only(classifier):
    model, tokenizer = classifier
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    grams = gram_matrices(model, [batch], within="bert")
    rows = _rows_of_each_text(model, tokenizer)
    assert set(grams) == {name for name in rows if name.startswith("bert.")}
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    for name, gram in grams.items():
        x = np.concatenate(rows[name])
        expected_rows = len(TEXTS) if "pooler" in name else n_tokens
        assert x.shape[0] == expected_rows
        np.testing.assert_allclose(gram.double().numpy(), x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def test_a_padded_token_changes_no_statistic(classifier):
    model, tokenizer = classifier
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    other["token_type_ids"] = batch["token_type_ids"].masked_fill(batch["attention_mask"] == 0, 1)
    y = torch.tensor(LABELS)
    for compute in (
        lambda b: gram_matrices(model, [b]),
        lambda b: fisher_diagonal(model, [(b, y)], kind="empirical"),
    ):
        first, second = compute(batch), compute(other)
        for name in first:
            torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-9)


def test_padding_masks_that_are_not_padding_are_refused():
    ids = torch.ones(2, 4, dtype=torch.long)
    for mask, message in [
        (torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), "0s between its real tokens"),
        (torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "example 0 has no real token"),
        (torch.tensor([[1, 2, 1, 1], [1, 1, 1, 1]]), "other than 0 and 1"),
    ]:
        with pytest.raises(DataError, match=message):
            padding_mask({"input_ids": ids, "attention_mask": mask})
    # a tensor batch and a batch without padding pass through unchanged
    assert list(unpadded(ids, None))[0][0] is ids
    full = {"input_ids": ids, "attention_mask": torch.ones(2, 4)}
    assert list(unpadded(full, None))[0][0] is full


def test_backbone_layers_are_named_as_in_the_checkpoint(classifier, tmp_path):
    model, _ = classifier
    assert backbone_name(model) == "bert"
    assert backbone_name(model.bert) is None  # a BertModel is its own backbone
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    names = [names[0] for _, names in linear_layers(model, within="bert").values()]
    assert len(names) == 2 * 6 + 1  # 6 linear layers per encoder layer, and the pooler
    assert set(names) <= stored and not any(n.startswith("classifier") for n in names)
    with pytest.raises(ConfigError, match="no submodule 'encoder'"):
        linear_layers(model, within="encoder")


def test_gram_written_in_passes_equals_one_pass(classifier, tmp_path):
    model, tokenizer = classifier
    batches = [
        dict(tokenizer(TEXTS[:3], padding=True, return_tensors="pt")),
        dict(tokenizer(TEXTS[3:], padding=True, return_tensors="pt")),
    ]
    whole = gram_matrices(model, batches, within="bert")
    budget = 3 * 8 * 16 * 16  # three 16x16 float64 sums per pass
    assert len(gram_passes(model, within="bert", max_bytes=budget)) > 3
    seen: list[int] = []
    written = write_gram_matrices(
        model,
        iter(batches),
        tmp_path / "g.safetensors",
        within="bert",
        max_bytes=budget,
        progress=seen.append,
    )
    assert os.listdir(tmp_path) == ["g.safetensors"]
    back = load(tmp_path / "g.safetensors")
    assert back.kind == "gram" and back.n_examples == 6 == written.n_examples
    assert set(back) == set(whole) == set(written.names)
    for name in whole:
        torch.testing.assert_close(back[name], whole[name])
    assert seen[-1] == 6 * len(gram_passes(model, within="bert", max_bytes=budget))


def test_statistics_writer_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "s.safetensors"
    layout = {"a": ((2,), torch.float32)}
    with pytest.raises(ConfigError, match="declared torch.float32 of shape \\[2\\]"):
        with StatisticsWriter(target, layout, kind="fisher") as writer:
            writer.write("a", torch.ones(3))
    with pytest.raises(ConfigError, match="not declared"):
        with StatisticsWriter(target, layout) as writer:
            writer.write("b", torch.ones(2))
    assert os.listdir(tmp_path) == []


def _save_folder(folder: Path, model, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def test_loading_a_backbone_seeds_its_head_and_refuses_a_missing_tokenizer(tmp_path):
    tokenizer = _tokenizer()
    torch.manual_seed(1)
    backbone = transformers.BertModel(_config())
    folder = _save_folder(tmp_path / "base", backbone, tokenizer)
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="2 tensors not in the checkpoint .*seed 3"):
        first, _ = load_sequence_classifier(folder, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, tok = load_sequence_classifier(folder, seed=3)
        other, _ = load_sequence_classifier(folder, seed=4)
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    torch.testing.assert_close(
        first.bert.encoder.layer[0].output.dense.weight,
        backbone.encoder.layer[0].output.dense.weight,
    )
    assert tok("good film")["input_ids"] == tokenizer("good film")["input_ids"]

    bare = _save_folder(tmp_path / "bare", backbone)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_sequence_classifier(bare)
    small = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**_config().to_dict(), "vocab_size": 8})
    )
    mismatched = _save_folder(tmp_path / "small", small, tokenizer)
    with pytest.raises(CheckpointError, match="20 tokens but the model has 8 embedding rows"):
        load_sequence_classifier(mismatched)
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_sequence_classifier(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json there"):
        load_sequence_classifier(tmp_path)
