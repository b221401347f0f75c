import os

import pytest
import torch
from safetensors import safe_open

from modelfuse.errors import CheckpointError, ConfigError, OutputError
from modelfuse.statistics import Statistics, load, save


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)
    stats = Statistics(
        {"a.weight": shared, "b.weight": shared, "c": torch.ones(2)},
        kind="fisher",
        n_examples=123,
        estimator="empirical",
    )
    path = save(stats, tmp_path / "f.safetensors")
    assert os.listdir(tmp_path) == ["f.safetensors"]  # no temporary file left behind
    back = load(path)
    assert (back.kind, back.n_examples, back.estimator) == ("fisher", 123, "empirical")
    assert set(back) == set(stats)
    for name in stats:
        torch.testing.assert_close(back[name], stats[name])
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["modelfuse.statistics"] == "fisher" and meta["modelfuse.n_examples"] == "123"


def test_plain_dict_with_explicit_metadata_and_overwrite(tmp_path):
    target = tmp_path / "g.safetensors"
    target.write_bytes(b"old")
    save({"w": torch.eye(3)}, target, kind="gram", n_examples=5)
    back = load(target)
    assert back.kind == "gram" and back.n_examples == 5 and back.estimator is None
    torch.testing.assert_close(back["w"], torch.eye(3))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such statistics file"):
        load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load(junk)
    with pytest.raises(OutputError, match="does not exist"):
        save({"w": torch.ones(1)}, tmp_path / "nope" / "f.safetensors", kind="fisher")
    with pytest.raises(ConfigError, match="fisher, gram"):
        save({"w": torch.ones(1)}, tmp_path / "f.safetensors", kind="hessian")  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["junk.safetensors"]
