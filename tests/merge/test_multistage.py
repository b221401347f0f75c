"""Multi-stage merges: several named merges in one file, run in dependency order.

The reference for every output is the same merges run one by one with
:func:`modelfuse.merge.merge`, each reading the previous one's output folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from modelfuse.checkpoint.writer import MARKER_NAME, _marker_text
from modelfuse.errors import CheckpointError, ConfigError, ModelfuseError, OutputError
from modelfuse.merge import merge, multistage
from modelfuse.merge.multistage import is_multistage, merge_multistage, plan_multistage
from modelfuse.merge.multistage_config import read_stages

from .conftest import random_state, tiny_llama

CHAIN = """\
name: a
merge_method: linear
models: [m1, m2]
---
name: b
merge_method: slerp
base_model: a
models: [a, m3]
parameters: {t: 0.3}
---
merge_method: task_arithmetic
base_model: m0
models:
  - model: b
    parameters: {weight: 0.7}
  - model: m4
    parameters: {weight: 0.4}
"""


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five tiny Llama folders m0 (the base) .. m4, float32 safetensors."""
    folder = tmp_path_factory.mktemp("llamas")
    for i in range(5):
        tiny_llama(seed=i).save_pretrained(folder / f"m{i}", safe_serialization=True)
    return folder


def _one_by_one(llamas: Path, out: Path) -> dict[str, Path]:
    """The chain's three merges run separately, each with the previous output's path."""
    m = {i: str(llamas / f"m{i}") for i in range(5)}
    a, b, final = out / "A", out / "B", out / "final"
    merge({"merge_method": "linear", "models": [m[1], m[2]]}, a)
    merge(
        {
            "merge_method": "slerp",
            "base_model": str(a),
            "models": [str(a), m[3]],
            "parameters": {"t": 0.3},
        },
        b,
    )
    merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": m[0],
            "models": [
                {"model": str(b), "parameters": {"weight": 0.7}},
                {"model": m[4], "parameters": {"weight": 0.4}},
            ],
        },
        final,
    )
    return {"a": a, "b": b, "final": final}


def _bytes(folder: Path, name: str = "model.safetensors") -> bytes:
    return (folder / name).read_bytes()


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _small(tmp_path: Path, count: int = 3) -> None:
    """Plain safetensors files m0.safetensors .. beside the configuration."""
    for i in range(count):
        save_file(random_state(i), tmp_path / f"m{i}.safetensors")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stages.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, kind: type[ModelfuseError] = ConfigError, **kwargs) -> str:
    """The message of the error a multi-stage file raises; nothing may be written."""
    before = _listing(tmp_path)
    config = _config(tmp_path, text)
    with pytest.raises(kind) as info:
        merge_multistage(config, tmp_path / "out", **kwargs)
    assert _listing(tmp_path) == sorted({*before, "stages.yaml"})
    return str(info.value)


# --- the chain of the brief ------------------------------------------------------------


def test_three_stage_chain_equals_the_merges_run_one_by_one(llamas, tmp_path):
    reference = _one_by_one(llamas, tmp_path / "reference")
    config = llamas / "chain.yaml"
    config.write_text(CHAIN)
    result = merge_multistage(config, tmp_path / "out")
    assert _bytes(result.out) == _bytes(reference["final"])
    assert _bytes(result.out, "config.json") == _bytes(reference["final"], "config.json")
    assert [stage.label for stage, _ in result.stages] == ["a", "b", "the final merge"]
    # Without --intermediate-dir the intermediate outputs are gone: nothing beside out.
    assert _listing(tmp_path) == ["out", "reference"]
    summary = result.summary().splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "stage 1/3 a",
        "stage 2/3 b",
        "stage 3/3 the final merge",
    ]
    assert "temporary, removed" in summary[0]


def test_the_output_records_every_stage_and_reruns_to_the_same_bytes(llamas, tmp_path):
    config = llamas / "chain.yaml"
    config.write_text(CHAIN)
    first = merge_multistage(config, tmp_path / "first")
    record = list(yaml.safe_load_all((first.out / "modelfuse.yaml").read_text()))
    assert [d.get("name") for d in record] == ["a", "b", None]
    assert record[1]["base_model"] == "a" and record[2]["models"][0]["model"] == "b"
    assert record[0]["models"][0]["model"] == str(llamas / "m1")
    card = (first.out / "README.md").read_text()
    assert "## Stages" in card and ".tmp-" not in card
    again = merge_multistage(first.out / "modelfuse.yaml", tmp_path / "again")
    assert _bytes(again.out) == _bytes(first.out)


def test_intermediate_dir_keeps_every_stage(llamas, tmp_path):
    reference = _one_by_one(llamas, tmp_path / "reference")
    config = llamas / "chain.yaml"
    config.write_text(CHAIN)
    kept = tmp_path / "stages"
    result = merge_multistage(config, tmp_path / "out", intermediate_dir=kept)
    assert _listing(kept) == ["a", "b"]
    assert _bytes(kept / "a") == _bytes(reference["a"])
    assert _bytes(kept / "b") == _bytes(reference["b"])
    assert _bytes(result.out) == _bytes(reference["final"])
    assert _listing(tmp_path) == ["out", "reference", "stages"]
    assert f"kept in {kept / 'a'}" in result.summary()


# --- order and the final merge ---------------------------------------------------------


def test_stages_run_in_dependency_order_whatever_the_file_order(tmp_path):
    _small(tmp_path)
    text = (
        "merge_method: linear\nmodels: [second, m2.safetensors]\n---\n"
        "name: second\nmerge_method: linear\nmodels: [first, m1.safetensors]\n---\n"
        "name: first\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n"
    )
    config = _config(tmp_path, text)
    planned = plan_multistage(config, tmp_path / "out")
    assert [(s.label, s.document, s.number) for s in planned] == [
        ("first", 3, 1),
        ("second", 2, 2),
        ("the final merge", 1, 3),
    ]
    assert _listing(tmp_path) == ["m0.safetensors", "m1.safetensors", "m2.safetensors", "stages.yaml"]
    result = merge_multistage(config, tmp_path / "out")
    m = [random_state(i) for i in range(3)]
    # linear with default weights is the mean: ((m0 + m1) / 2 + m1) / 2, then with m2.
    first = (m[0]["model.norm.weight"] + m[1]["model.norm.weight"]) / 2
    second = (first + m[1]["model.norm.weight"]) / 2
    expected = (second + m[2]["model.norm.weight"]) / 2
    merged = load_file(result.out / "model.safetensors")
    torch.testing.assert_close(merged["model.norm.weight"], expected, rtol=0, atol=1e-6)


def test_when_every_document_has_a_name_the_last_is_final(tmp_path):
    _small(tmp_path)
    text = (
        "name: x\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "name: y\nmerge_method: linear\nmodels: [x, m2.safetensors]\n"
    )
    planned = plan_multistage(_config(tmp_path, text), tmp_path / "out")
    assert [(s.name, s.final, s.out) for s in planned] == [
        ("x", False, None),
        ("y", True, tmp_path / "out"),
    ]


def test_relative_paths_are_found_beside_the_file_from_another_folder(tmp_path, monkeypatch):
    _small(tmp_path)
    config = _config(
        tmp_path,
        "name: x\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [x, m2.safetensors]\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = merge_multistage(config, tmp_path / "out")
    assert result.out == tmp_path / "out"


def test_a_stage_the_final_merge_does_not_use_needs_intermediate_dir(tmp_path):
    _small(tmp_path)
    text = (
        "name: spare\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [m1.safetensors, m2.safetensors]\n"
    )
    message = _error(tmp_path, text)
    assert "stage 'spare' (document 1) is not used by the final merge" in message
    assert "--intermediate-dir" in message
    result = merge_multistage(
        tmp_path / "stages.yaml", tmp_path / "out", intermediate_dir=tmp_path / "kept"
    )
    assert _listing(tmp_path / "kept") == ["spare"]
    assert [stage.label for stage, _ in result.stages] == ["spare", "the final merge"]


# --- refused files: one message naming the problem, nothing written -------------------


def test_a_cycle_is_refused_naming_it(tmp_path):
    _small(tmp_path)
    text = (
        "name: a\nmerge_method: linear\nmodels: [b, m0.safetensors]\n---\n"
        "name: b\nmerge_method: linear\nmodels: [a, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [b, m2.safetensors]\n"
    )
    assert "in a cycle: a -> b -> a;" in _error(tmp_path, text)


def test_a_stage_using_itself_is_a_cycle(tmp_path):
    _small(tmp_path)
    text = (
        "name: a\nmerge_method: linear\nmodels: [a, m0.safetensors]\n---\n"
        "merge_method: linear\nmodels: [a, m1.safetensors]\n"
    )
    assert "in a cycle: a -> a;" in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        ("x", "the stage name 'x' is given twice"),
        ("X", "the stage name 'X' and 'x' differ only in case"),
    ],
)
def test_duplicate_names_are_refused(tmp_path, second, expected):
    _small(tmp_path)
    text = (
        "name: x\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        f"name: {second}\nmerge_method: linear\nmodels: [m1.safetensors, m2.safetensors]\n---\n"
        "merge_method: linear\nmodels: [x, m2.safetensors]\n"
    )
    message = _error(tmp_path, text)
    assert "document 2" in message and expected in message


def test_two_documents_without_a_name_are_refused(tmp_path):
    _small(tmp_path)
    text = (
        "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [m1.safetensors, m2.safetensors]\n"
    )
    assert "documents 1, 2 have no name; only the final merge" in _error(tmp_path, text)


def test_an_unknown_reference_that_is_not_a_path_is_refused(tmp_path):
    _small(tmp_path)
    text = (
        "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [aa, m2.safetensors]\n"
    )
    message = _error(tmp_path, text)
    assert "the final merge (document 2, no name): models[0].model: 'aa' is neither a stage's name" in message
    assert "(names: a)" in message


def test_a_name_that_is_also_an_existing_path_is_refused_where_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./a is found as given, from the working directory
    _small(tmp_path)
    save_file(random_state(5), tmp_path / "a")
    text = (
        "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [a, m2.safetensors]\n"
    )
    message = _error(tmp_path, text)
    assert "models[0].model: 'a' is both a stage's name and an existing path" in message
    assert "./a" in message
    # Written another way, it is the path; the stage is then unused (refused without a folder).
    text = text.replace("models: [a, m2", "models: [./a, m2")
    assert "stage 'a' (document 1) is not used" in _error(tmp_path, text)
    result = merge_multistage(tmp_path / "stages.yaml", tmp_path / "out", intermediate_dir=tmp_path / "k")
    merged = load_file(result.out / "model.safetensors")["model.norm.weight"]
    expected = (random_state(5)["model.norm.weight"] + random_state(2)["model.norm.weight"]) / 2
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nmerge_method: linear\nmodels: [m0.safetensors]\n---\n---\n"
         "merge_method: linear\nmodels: [a, m1.safetensors]\n", "document 2 is empty"),
        ("name: a\nmerge_method: linear\nmodels: [m0.safetensors]\n---\n",
         "document 2 is empty"),
        ("name: a\n---\nmerge_method: linear\nmodels: [m1.safetensors]\n",
         "document 1 holds only a name"),
        ("- a\n---\nmerge_method: linear\nmodels: [m1.safetensors]\n",
         "document 1: expected a mapping with name, merge_method and models, got list"),
        ("name: ../up\nmerge_method: linear\nmodels: [m0.safetensors]\n---\n"
         "merge_method: linear\nmodels: [m1.safetensors]\n", "name: '../up' is not a stage name"),
        ("name: 7\nmerge_method: linear\nmodels: [m0.safetensors]\n---\n"
         "merge_method: linear\nmodels: [m1.safetensors]\n", "name: 7 is not a stage name"),
    ],
)
def test_malformed_documents_are_refused(tmp_path, text, expected):
    _small(tmp_path)
    assert expected in _error(tmp_path, text)


def test_a_bad_key_in_stage_two_names_the_stage_before_any_work(tmp_path):
    _small(tmp_path)
    text = (
        "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "name: b\nmerge_method: linear\nmodels: [a, m2.safetensors]\nwieght: 2\n---\n"
        "merge_method: linear\nmodels: [b, m2.safetensors]\n"
    )
    message = _error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'stages.yaml'}: stage 'b' (document 2): wieght: ")
    assert "unknown key" in message


def test_an_unknown_parameter_in_stage_two_is_found_when_planned(tmp_path):
    _small(tmp_path)
    text = (
        "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [a, m2.safetensors]\nparameters: {lamda: 2}\n"
    )
    message = _error(tmp_path, text)
    assert "the final merge (document 2, no name): parameters" in message and "lamda" in message


def test_a_mismatch_with_an_earlier_stages_output_is_found_before_any_work(tmp_path):
    _small(tmp_path)
    odd = random_state(3)
    odd["model.norm.weight"] = torch.ones(5)
    save_file(odd, tmp_path / "odd.safetensors")
    text = (
        "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [a, odd.safetensors]\n"
    )
    message = _error(tmp_path, text, CheckpointError)
    assert "the final merge (document 2, no name)" in message
    assert "model.norm.weight" in message
    assert "modelfuse-stages" not in message  # the planned output is named by its stage


def test_the_final_merge_used_by_another_stage_is_refused(tmp_path):
    _small(tmp_path)
    text = (
        "name: spare\nmerge_method: linear\nmodels: [last, m0.safetensors]\n---\n"
        "name: last\nmerge_method: linear\nmodels: [m1.safetensors, m2.safetensors]\n"
    )
    message = _error(tmp_path, text, intermediate_dir=tmp_path / "kept")
    assert "stage 'spare' (document 1) uses 'last', the final merge" in message


def test_an_output_that_is_an_input_of_any_stage_is_refused_even_with_overwrite(tmp_path):
    _small(tmp_path)
    (tmp_path / "out").mkdir()
    save_file(random_state(0), tmp_path / "out" / "model.safetensors")
    text = (
        "name: a\nmerge_method: linear\nmodels: [out, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [a, m2.safetensors]\n"
    )
    message = _error(tmp_path, text, OutputError, overwrite=True)
    assert "is the input of stage 'a'" in message


def test_an_existing_intermediate_output_is_refused(tmp_path):
    _small(tmp_path)
    (tmp_path / "kept" / "a").mkdir(parents=True)
    text = (
        "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
        "merge_method: linear\nmodels: [a, m2.safetensors]\n"
    )
    message = _error(tmp_path, text, OutputError, intermediate_dir=tmp_path / "kept")
    assert "already exists (the output of stage 'a')" in message
    assert _listing(tmp_path / "kept" / "a") == []


def test_aliases_are_bounded_across_documents(tmp_path):
    laughs = "name: a\nmerge_method: linear\nmodels: [m0.safetensors]\nx0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    for i in range(1, 9):
        laughs += f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n"
    text = laughs + "---\nmerge_method: linear\nmodels: [a]\ny: *x8\n"
    assert "beyond" in _error(tmp_path, text) or "not valid YAML" in _error(tmp_path, text)


def test_a_single_document_is_not_multistage(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("merge_method: linear\nmodels: [m0.safetensors]\n")
    assert not is_multistage(one)
    assert not is_multistage(tmp_path / "missing.yaml")
    assert is_multistage(_config(tmp_path, "name: a\n---\nmerge_method: linear\n"))
    with pytest.raises(ConfigError, match="holds 1 merge document"):
        merge_multistage(one, tmp_path / "out")


# --- failures and interruptions leave nothing ------------------------------------------

TWO_STAGES = (
    "name: a\nmerge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n---\n"
    "merge_method: linear\nmodels: [a, m2.safetensors]\n"
)


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("when", ["between stages", "inside a stage"])
def test_an_interrupted_run_leaves_nothing(tmp_path, kept, when):
    _small(tmp_path)
    config = _config(tmp_path, TWO_STAGES)
    before = _listing(tmp_path)
    folder = tmp_path / "kept" / "deeper" if kept else None

    def interrupt(*args):
        raise KeyboardInterrupt

    class Progress:
        def __init__(self, stage):
            self.stage = stage

        def __enter__(self):
            if self.stage.number == 2 and when == "between stages":
                interrupt()
            return interrupt if self.stage.number == 2 else None

        def __exit__(self, *exc):
            return False

    with pytest.raises(KeyboardInterrupt):
        merge_multistage(config, tmp_path / "out", intermediate_dir=folder, stage_progress=Progress)
    assert _listing(tmp_path) == before


def test_a_failing_stage_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    _small(tmp_path)
    config = _config(tmp_path, TWO_STAGES)
    before = _listing(tmp_path)
    real = multistage.merge

    def failing(cfg, out, **kwargs):
        if Path(out) == tmp_path / "out":
            raise OutputError(f"{out}: no space left on device; nothing was written")
        return real(cfg, out, **kwargs)

    monkeypatch.setattr(multistage, "merge", failing)
    with pytest.raises(OutputError, match=r"the final merge \(document 2, no name\): .*no space"):
        merge_multistage(config, tmp_path / "out")
    assert _listing(tmp_path) == before


def test_planning_leaves_no_placeholder_behind(tmp_path, monkeypatch):
    _small(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    plan_multistage(_config(tmp_path, TWO_STAGES), tmp_path / "out")
    assert _listing(scratch) == []
    assert not (tmp_path / "out").exists()


def test_a_long_chain_is_ordered_and_a_long_cycle_named_in_bounds(tmp_path):
    _small(tmp_path, 1)
    count = 1200  # deeper than Python's default recursion limit
    documents = ["name: s0\nmerge_method: linear\nmodels: [m0.safetensors]\n"]
    documents += [f"name: s{i}\nmerge_method: linear\nmodels: [s{i - 1}]\n" for i in range(1, count)]
    documents.append(f"merge_method: linear\nmodels: [s{count - 1}]\n")
    config = _config(tmp_path, "---\n".join(documents))
    order = read_stages(config, keep_all=False)
    assert [stage.name for stage in order] == [*(f"s{i}" for i in range(count)), None]
    documents[0] = f"name: s0\nmerge_method: linear\nmodels: [s{count - 1}]\n"
    config.write_text("---\n".join(documents))
    with pytest.raises(ConfigError) as info:
        read_stages(config, keep_all=False)
    message = str(info.value)
    last = [f"s{count - i}" for i in range(1, 5)]
    assert f"cycle: s0 -> {' -> '.join(last)} -> ({count - 9} more) -> s4 -> s3 -> s2 -> s1 -> s0;" in message
    assert message.count("->") == 10


def test_the_temporary_folder_is_the_writers_kind_so_a_killed_run_is_cleaned_up(tmp_path):
    import subprocess
    import sys

    _small(tmp_path)
    config = _config(tmp_path, TWO_STAGES)
    seen = []

    class Look:
        def __init__(self, stage):
            self.stage = stage

        def __enter__(self):
            if self.stage.number == 2:
                seen.extend(
                    (p, (p / MARKER_NAME).is_file(), (p / "a").is_dir())
                    for p in tmp_path.iterdir()
                    if p.name.startswith(".out.tmp-")
                )
            return None

        def __exit__(self, *exc):
            return False

    merge_multistage(config, tmp_path / "out", stage_progress=Look)
    assert len(seen) == 1 and seen[0][1:] == (True, True) and not seen[0][0].exists()
    # A folder left by a killed run (its process no longer runs) goes at the next run.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    left = tmp_path / ".again.tmp-0123abcd"
    (left / "a").mkdir(parents=True)
    marker = _marker_text().replace(f"pid={os.getpid()}", f"pid={int(done.stdout)}")
    (left / MARKER_NAME).write_text(marker)
    result = merge_multistage(config, tmp_path / "again")
    assert not left.exists()
    assert any("interrupted modelfuse run" in note for note in result.stages[-1][1].notes)


def test_merge_of_a_multistage_file_points_to_merge_multistage(tmp_path):
    _small(tmp_path)
    config = _config(tmp_path, TWO_STAGES)
    with pytest.raises(ConfigError, match="a second YAML document starts at line 4: a multi-stage"):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
