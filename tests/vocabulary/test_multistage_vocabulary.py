"""Multi-stage merges whose stages build vocabularies: a later stage reads the tokenizer an
earlier one writes, and names that stage in its own tokenizer settings.

The reference is the same merges run one by one with :func:`modelfuse.merge.merge`,
the second naming the first's output folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelfuse.cli import main
from modelfuse.merge import merge
from modelfuse.merge.multistage import plan_multistage

from ._tiny import SPECIAL, WORDS, tiny_llama

IM = ["<|im_start|>", "<|im_end|>"]
EMBED = "model.embed_tokens.weight"

STAGES = """\
name: union
merge_method: ties
base_model: base
models:
  - model: chat
    parameters: {weight: 0.5, density: 0.5}
  - model: code
    parameters: {weight: 0.5, density: 0.5}
tokenizer_source: union
---
merge_method: task_arithmetic
base_model: base
models:
  - model: union
    parameters: {weight: 0.5}
tokenizer:
  source: base
  tokens:
    <|im_start|>:
      source: union
      force: true
chat_template: chatml
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base; chat adds <|im_start|> and <|im_end|>; code adds two words; and the stages' file."""
    root = tmp_path_factory.mktemp("stages")
    tiny_llama(root / "base", SPECIAL + WORDS, seed=0)
    tiny_llama(root / "chat", SPECIAL + WORDS, IM, seed=1)
    tiny_llama(root / "code", SPECIAL + WORDS + ["def", "return"], seed=2)
    (root / "stages.yaml").write_text(STAGES)
    return root


def _one_by_one(folder: Path, out: Path) -> tuple[Path, Path]:
    """The file's two merges run separately, the second naming the first's output."""
    documents = STAGES.split("---\n")
    first, second = (yaml.safe_load(d) for d in documents)
    first.pop("name")
    for config in (first, second):
        config["base_model"] = str(folder / config["base_model"])
        for entry in config["models"]:
            entry["model"] = str(folder / entry["model"])
    union = out / "union"
    merge(first, union)
    second["models"][0]["model"] = str(union)
    second["tokenizer"]["tokens"]["<|im_start|>"]["source"] = str(union)
    final = out / "final"
    merge(second, final)
    return union, final


def test_a_stage_reads_the_vocabulary_an_earlier_stage_builds(folder, tmp_path, monkeypatch):
    # run from another folder: every reference, the tokenizer's too, is found beside the file
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "kept"
    argv = ["merge", str(folder / "stages.yaml"), "out", "--intermediate-dir", str(kept), "--quiet"]
    assert main(argv) == 0
    union, final = _one_by_one(folder, tmp_path / "reference")
    for name in ("model.safetensors",):
        assert load_file(tmp_path / "out" / name).keys() == load_file(final / name).keys()
        for key, value in load_file(tmp_path / "out" / name).items():
            assert torch.equal(value, load_file(final / name)[key]), key
    # the forced token's row is the first stage's, for the base that lacks it and for the
    # union alike: task arithmetic of equal rows is that row
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == len(SPECIAL + WORDS) + 1
    row = tokenizer.convert_tokens_to_ids("<|im_start|>")
    first = AutoTokenizer.from_pretrained(kept / "union")
    union_rows = load_file(kept / "union" / "model.safetensors")[EMBED]
    expected = union_rows[first.convert_tokens_to_ids("<|im_start|>")]
    assert torch.equal(model.get_input_embeddings().weight[row].detach(), expected)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize("copy_tokenizer", [True, False])
def test_checking_the_file_plans_against_the_earlier_stages_tokenizer(folder, copy_tokenizer):
    # stage one builds its vocabulary, whose files it writes even without copying tokenizers
    stages = plan_multistage(
        folder / "stages.yaml", folder / "never-written", copy_tokenizer=copy_tokenizer
    )
    assert [s.label for s in stages] == ["union", "the final merge"]
    assert not (folder / "never-written").exists()


TWINS = """\
name: first
merge_method: linear
models: [base, twin]
---
merge_method: linear
models: [first, chat]
tokenizer_source: union
"""


@pytest.mark.parametrize("copy", [True, False])
def test_a_later_stage_reads_the_tokenizer_an_earlier_one_copies_or_is_refused_without(
    folder, tmp_path, capsys, copy
):
    # stage one builds no vocabulary: its output has the base's tokenizer files only when
    # tokenizers are copied, and the second stage's union reads them
    tiny_llama(tmp_path / "twin", SPECIAL + WORDS, seed=3)
    for name in ("base", "chat"):
        (tmp_path / name).symlink_to(folder / name)
    (tmp_path / "stages.yaml").write_text(TWINS)
    capsys.readouterr()  # transformers' own lines while saving the twin
    argv = ["merge", str(tmp_path / "stages.yaml"), str(tmp_path / "out"), "--quiet"]
    if not copy:
        argv.append("--no-copy-tokenizer")
    code = main(argv)
    err = capsys.readouterr().err
    if copy:
        assert code == 0, err
        from transformers import AutoTokenizer

        assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == len(SPECIAL + WORDS + IM)
        return
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    assert "the final merge" in lines[0] and "'first' has no tokenizer files" in lines[0], err
    assert not (tmp_path / "out").exists()
