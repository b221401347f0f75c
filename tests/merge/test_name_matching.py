"""Real checkpoints as users have them: buffers some files store, task heads around a backbone.

A ``BertModel`` base that stores ``embeddings.position_ids`` (as many hub files do) is merged
with ``BertForSequenceClassification`` fine-tunes saved by current transformers (keys under
``bert.``, a ``classifier`` head, no ``position_ids``); every merged tensor is compared with
task arithmetic written out here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.cli import main
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.name_matching import (
    NameMap,
    RenamedSource,
    find_prefix,
    is_buffer,
    with_merged_backbone,
)

transformers = pytest.importorskip("transformers")


def _config(labels: int = 2):
    return transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=labels,
    )


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory):
    """A BertModel base storing position_ids, and two classifiers (2 and 3 labels)."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = transformers.BertModel(_config()).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    weights = load_file(base_dir / "model.safetensors")
    assert "embeddings.position_ids" not in weights  # current transformers leaves it out
    weights["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    tuned = []
    for i, labels in enumerate((2, 3)):
        model = transformers.BertForSequenceClassification(_config(labels)).eval()
        with torch.no_grad():
            for name, parameter in model.bert.named_parameters():
                parameter.copy_(base.get_parameter(name) + 0.01 * (i + 1) * torch.randn_like(parameter))
        folder = root / f"task{i}"
        model.save_pretrained(folder)
        tuned.append(folder)
    return base_dir, tuned


def _task_arithmetic(base: dict, tuned: list[dict], lam: float) -> dict:
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        taus = [t["bert." + name].float() - b.float() for t in tuned]
        out[name] = b.float() + lam * sum(taus)
    return out


def _yaml(base_dir, tuned, **extra) -> dict:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base_dir),
        "models": [str(t) for t in tuned],
        "parameters": {"lambda": 0.5},
        "dtype": "float32",
    }
    config.update(extra)
    return config


def test_classifiers_of_a_bert_base_merge_by_prefix_with_their_heads_kept(bert_folders, tmp_path):
    base_dir, tuned = bert_folders
    out = tmp_path / "merged"
    result = modelfuse.merge(_yaml(base_dir, tuned, allow_prefix=True, heads="keep"), out)
    merged = load_file(out / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    fine = [load_file(t / "model.safetensors") for t in tuned]
    expected = _task_arithmetic(base, fine, 0.5)
    assert sorted(merged) == sorted(base)  # the base's names, position_ids included
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].float(), value.float(), rtol=0, atol=1e-6)
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])
    assert any("matched by prefix" in n for n in result.notes)
    assert any("heads/" in n for n in result.notes)
    for folder, own in zip(("task0", "task1"), fine):
        head = load_file(out / "heads" / folder / "model.safetensors")
        assert sorted(head) == ["classifier.bias", "classifier.weight"]
        assert torch.equal(head["classifier.weight"], own["classifier.weight"])
        saved = json.loads((out / "heads" / folder / "config.json").read_text())
        assert saved["architectures"] == ["BertForSequenceClassification"]
    # each task's model: the merged backbone and its own head, loadable strictly
    labels = 3
    task = transformers.BertForSequenceClassification(_config(labels)).eval()
    state = with_merged_backbone({**fine[1]}, merged)
    missing, unexpected = task.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing)
    torch.testing.assert_close(task.bert.embeddings.word_embeddings.weight, merged["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(task.classifier.weight, fine[1]["classifier.weight"])
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert task(input_ids=ids).logits.shape == (1, labels)


def test_heads_drop_writes_no_head_and_without_heads_the_head_is_refused(bert_folders, tmp_path):
    base_dir, tuned = bert_folders
    out = tmp_path / "dropped"
    result = modelfuse.merge(_yaml(base_dir, tuned, allow_prefix=True, heads="drop"), out)
    assert not (out / "heads").exists()
    assert any("dropped (heads: drop)" in n for n in result.notes)
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*set heads: keep or heads: drop"):
        modelfuse.merge(_yaml(base_dir, tuned, allow_prefix=True), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_without_allow_prefix_the_names_and_architectures_are_refused(bert_folders, tmp_path):
    base_dir, tuned = bert_folders
    with pytest.raises(CheckpointError, match="different architectures"):
        modelfuse.merge(_yaml(base_dir, tuned, heads="drop"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="missing from"):
        modelfuse.merge(_yaml(base_dir, tuned, heads="drop"), tmp_path / "b", allow_crimes=True)


def test_cli_allow_prefix_flag(bert_folders, tmp_path, capsys):
    import yaml

    base_dir, tuned = bert_folders
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_yaml(base_dir, tuned, heads="drop")))
    out = tmp_path / "cli"
    assert main(["merge", str(path), str(out), "--allow-prefix", "--quiet"]) == 0
    assert "allow_prefix: true" in (out / "modelfuse.yaml").read_text()
    capsys.readouterr()
    slices = {
        "merge_method": "linear",
        "allow_prefix": True,
        "slices": [{"sources": [{"model": str(base_dir), "layer_range": [0, 2]}]}],
    }
    path.write_text(yaml.safe_dump(slices))
    assert main(["merge", str(path), str(tmp_path / "sliced"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allow_prefix: works with models:, not with slices:" in err[0]
    assert not (tmp_path / "sliced").exists()


def test_a_buffer_only_the_base_stores_is_carried_and_a_missing_weight_is_not(tmp_path):
    base = {"w": torch.ones(3), "position_ids": torch.arange(4), "rope.inv_freq": torch.rand(2)}
    tuned = {"w": torch.full((3,), 3.0)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base.safetensors"),
        "models": [str(tmp_path / "tuned.safetensors")],
    }
    result = modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["position_ids"], base["position_ids"])
    assert torch.equal(merged["rope.inv_freq"], base["rope.inv_freq"])
    torch.testing.assert_close(merged["w"], torch.full((3,), 3.0))
    [note] = [n for n in result.notes if "buffers" in n]
    assert "position_ids" in note and "rope.inv_freq" in note
    # a buffer only a fine-tune stores comes from it; a float weight missing stays an error
    save_file({"w": torch.ones(3)}, tmp_path / "bare.safetensors")
    save_file({"w": torch.ones(3), "position_ids": torch.arange(5)}, tmp_path / "has.safetensors")
    config["base_model"] = str(tmp_path / "bare.safetensors")
    config["models"] = [str(tmp_path / "has.safetensors")]
    modelfuse.merge(config, tmp_path / "out2")
    assert torch.equal(load_file(tmp_path / "out2" / "model.safetensors")["position_ids"], torch.arange(5))
    save_file({"w": torch.ones(3), "extra.weight": torch.ones(2)}, tmp_path / "more.safetensors")
    config["models"] = [str(tmp_path / "more.safetensors")]
    with pytest.raises(CheckpointError, match=r"extra\.weight is in .* but missing from"):
        modelfuse.merge(config, tmp_path / "out3")


def test_merge_state_dicts_matches_prefixes_and_drops_heads(bert_folders):
    base_dir, tuned = bert_folders
    base = load_file(base_dir / "model.safetensors")
    fine = [load_file(t / "model.safetensors") for t in tuned]
    merged = merge_state_dicts(
        "task_arithmetic", fine, base, allow_prefix=True, heads="drop", lambda_=0.5, dtype="float32"
    )
    expected = _task_arithmetic(base, fine, 0.5)
    assert sorted(merged) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].float(), value.float(), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="with_merged_backbone"):
        merge_state_dicts("linear", fine, base, allow_prefix=True, heads="keep")
    with pytest.raises(CheckpointError, match="missing from"):
        merge_state_dicts("task_arithmetic", fine, base, heads="drop")


def test_find_prefix_and_renamed_source():
    reference = ["model.layers.0.w", "model.norm.weight", "lm_head.weight"]
    wrapped = ["base_model.model." + n for n in reference]
    assert find_prefix(reference, wrapped) == NameMap(add="base_model.model.")
    bare = ["layers.0.w", "norm.weight"]
    assert find_prefix(reference, bare) == NameMap(strip="model.")

    class Source:
        def __init__(self, tensors):
            self.tensors = tensors
            self.path = "x"

        def keys(self):
            return list(self.tensors)

        def info(self, name):
            return self.tensors[name]

        def read(self, name):
            return self.tensors[name]

        def read_rows(self, name, a, b):
            return self.tensors[name][a:b]

    source = RenamedSource(
        Source({"bert.a": torch.arange(4), "classifier.weight": torch.ones(1)}), NameMap(add="bert.")
    )
    assert source.keys() == ["a", "classifier.weight"]
    assert torch.equal(source.read_rows("a", 1, 3), torch.tensor([1, 2]))
    assert source.original("a") == "bert.a" and source.path == "x"
    assert is_buffer("encoder.num_batches_tracked", torch.int64)
    with pytest.raises(ValueError, match="not of this backbone"):
        with_merged_backbone({"bert.a": torch.zeros(2)}, {"a": torch.zeros(3)})


def test_head_folder_names_are_safe_and_unique():
    from modelfuse.merge.heads import head_folder_names

    assert head_folder_names(["a/b/sst2", "c/sst2", "../..", "x:y"]) == ["sst2", "sst2-2", "model", "x_y"]


def test_config_heads_value_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="heads"):
        modelfuse.merge({"merge_method": "linear", "models": ["a", "b"], "heads": "maybe"}, tmp_path / "o")

