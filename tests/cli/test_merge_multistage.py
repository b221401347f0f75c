"""``modelfuse merge`` with a multi-stage file (mergekit-multi's format).

The reference for each output is the same merges run one by one through the
command line with single-document files. Bad files: exit 2, one line naming
the problem, nothing written, inputs untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelfuse.cli import INTERRUPTED, main
from modelfuse.progress import progress_bar

CHAIN = """\
name: a
merge_method: linear
models: [m1.safetensors, m2.safetensors]
---
name: b
merge_method: slerp
base_model: a
models: [a, m3.safetensors]
parameters: {t: 0.3}
---
merge_method: task_arithmetic
base_model: m0.safetensors
models:
  - model: b
    parameters: {weight: 0.7}
  - model: m4.safetensors
    parameters: {weight: 0.4}
"""


def _models(folder: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        save_file(
            {
                "model.embed_tokens.weight": torch.randn(6, 4, generator=g),
                "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g),
                "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g),
                "model.norm.weight": torch.randn(4, generator=g),
            },
            folder / f"m{i}.safetensors",
        )


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (hidden ones too) with its bytes and mtime."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(folder))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def _refused(tmp_path: Path, capsys, argv: list[str]) -> str:
    """Run ``modelfuse`` expecting exit 2 with one error line and no change on disk."""
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert _snapshot(tmp_path) == before
    return lines[0]


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _models(tmp_path)
    (tmp_path / "chain.yaml").write_text(CHAIN)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_chain_equals_the_merges_run_one_by_one_and_reports_each_stage(chain, capsys):
    (chain / "ref").mkdir()
    (chain / "ref" / "a.yaml").write_text(
        "merge_method: linear\nmodels: [m1.safetensors, m2.safetensors]\n"
    )
    (chain / "ref" / "b.yaml").write_text(
        "merge_method: slerp\nbase_model: ref/A\nmodels: [ref/A, m3.safetensors]\n"
        "parameters: {t: 0.3}\n"
    )
    (chain / "ref" / "final.yaml").write_text(CHAIN.split("---\n")[2].replace("model: b", "model: ref/B"))
    for name, out in (("a", "A"), ("b", "B"), ("final", "FINAL")):
        assert main(["merge", f"ref/{name}.yaml", f"ref/{out}", "--quiet"]) == 0
    capsys.readouterr()

    assert main(["merge", "chain.yaml", "out"]) == 0
    captured = capsys.readouterr()
    stages = [line for line in captured.err.splitlines() if line.startswith("stage ")]
    assert stages == ["stage 1/3: a", "stage 2/3: b", "stage 3/3: the final merge"]
    summary = captured.out.splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "stage 1/3 a",
        "stage 2/3 b",
        "stage 3/3 the final merge",
    ]
    assert "into out" in summary[-1]
    assert (chain / "out" / "model.safetensors").read_bytes() == (
        chain / "ref" / "FINAL" / "model.safetensors"
    ).read_bytes()
    assert sorted(p.name for p in chain.iterdir() if p.name.startswith(".")) == []


def test_intermediate_dir_keeps_the_stages(chain, capsys):
    assert main(["merge", "chain.yaml", "-o", "out", "--intermediate-dir", "kept", "--quiet"]) == 0
    assert sorted(os.listdir(chain / "kept")) == ["a", "b"]
    assert "kept in kept/a" in capsys.readouterr().out
    # The same run again finds the kept outputs and refuses to write over them.
    message = _refused(chain, capsys, ["merge", "chain.yaml", "out2", "-I", "kept"])
    assert "kept/a already exists (the output of stage 'a'); remove it" in message


def test_mergekit_multi_s_command_line(chain, capsys):
    # mergekit-multi FILE --intermediate-dir DIR --out-path OUT [--lazy]
    argv = ["merge", "chain.yaml", "--out-path", "out", "-I", "kept", "--lazy", "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "modelfuse: --lazy is mergekit's; an intermediate output is never reused" in err
    assert sorted(os.listdir(chain / "kept")) == ["a", "b"] and (chain / "out").is_dir()
    # without OUT, a final merge with a name goes to DIR/NAME, as mergekit-multi writes it
    named = CHAIN.replace("merge_method: task_arithmetic", "name: last\nmerge_method: task_arithmetic")
    (chain / "named.yaml").write_text(named)
    assert main(["merge", "named.yaml", "-I", "all", "--no-lazy", "--quiet"]) == 0
    assert sorted(os.listdir(chain / "all")) == ["a", "b", "last"]
    assert (chain / "all" / "last" / "model.safetensors").read_bytes() == (
        chain / "out" / "model.safetensors"
    ).read_bytes()
    # a final merge without a name has nowhere to go but OUT
    message = _refused(chain, capsys, ["merge", "chain.yaml", "-I", "elsewhere"])
    assert "the final merge of chain.yaml has no name" in message
    assert "give OUT (mergekit-multi's --out-path)" in message


def test_dry_run_checks_every_stage_lists_the_order_and_writes_nothing(chain, capsys):
    before = _snapshot(chain)
    assert main(["merge", "chain.yaml", "out", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "order: a -> b -> the final merge" in captured.out
    assert "stage 2/3: b -> a temporary folder" in captured.out
    assert "base: a\n" in captured.out  # the planned output is named by its stage
    assert "no problems found; out would be written" in captured.err
    assert _snapshot(chain) == before


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("models: [a, m3", "models: [b, m3"), "in a cycle: b -> b"),
        (("name: b\n", "name: a\n"), "document 2: the stage name 'a' is given twice"),
        (("model: b\n", "model: bb\n"), "models[0].model: 'bb' is neither a stage's name (names: a, b)"),
        (("---\nname: b", "---\n---\nname: b"), "document 2 is empty"),
        (("parameters: {t: 0.3}", "parameters: {t: 0.3}\nmodles: []"), "stage 'b' (document 2): modles: unknown key"),
        (("parameters: {t: 0.3}", "parameters: {t: 0.3, tt: 1}"), "stage 'b' (document 2): parameters: unknown parameter 'tt'"),
        (("name: a\n", ""), "documents 1, 3 have no name"),
    ],
)
def test_bad_files_are_refused_in_one_line(chain, capsys, change, expected):
    (chain / "chain.yaml").write_text(CHAIN.replace(*change))
    message = _refused(chain, capsys, ["merge", "chain.yaml", "out"])
    assert expected in message, message


def test_intermediate_dir_with_a_single_merge_is_refused(chain, capsys):
    (chain / "one.yaml").write_text("merge_method: linear\nmodels: [m1.safetensors, m2.safetensors]\n")
    message = _refused(chain, capsys, ["merge", "one.yaml", "out", "-I", "kept"])
    assert "--intermediate-dir: one.yaml holds one merge" in message


def test_intermediate_dir_inside_an_input_or_the_output_is_refused(chain, capsys):
    (chain / "folder").mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, chain / "folder" / "model.safetensors")
    (chain / "chain.yaml").write_text(CHAIN.replace("m4.safetensors", "folder"))
    message = _refused(chain, capsys, ["merge", "chain.yaml", "out", "-I", "folder/kept"])
    assert "is inside 'folder', an input of the final merge; choose a folder of its own" in message
    message = _refused(chain, capsys, ["merge", "chain.yaml", "out", "-I", "out/kept"])
    assert "is inside the output folder out" in message


def test_an_interrupted_run_leaves_nothing(chain, capsys, monkeypatch):
    from modelfuse.merge import multistage

    real = multistage.merge

    def interrupted(config, out, **kwargs):
        if Path(out).name == "b":  # stage a is written; stage b is interrupted
            raise KeyboardInterrupt
        return real(config, out, **kwargs)

    monkeypatch.setattr(multistage, "merge", interrupted)
    before = _snapshot(chain)
    assert main(["merge", "chain.yaml", "out", "--quiet"]) == 130
    assert INTERRUPTED in capsys.readouterr().err
    assert _snapshot(chain) == before
    assert main(["merge", "chain.yaml", "out", "--quiet", "-I", "kept"]) == 130
    assert _snapshot(chain) == before


def test_quiet_prints_no_stage_lines_and_no_bar(chain, capsys, monkeypatch):
    opened = []

    def counting(*args, **kwargs):
        opened.append(kwargs.get("enabled"))
        return progress_bar(*args, **kwargs)

    monkeypatch.setattr("modelfuse.progress.progress_bar", counting)
    assert main(["merge", "chain.yaml", "out", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert opened == [False, False, False]
    assert not [line for line in captured.err.splitlines() if line.startswith("stage ")]
    assert captured.out.splitlines()[-1].startswith("stage 3/3 the final merge: merged 4 tensors")


def test_a_warning_of_a_stage_is_one_line_naming_the_stage(chain, capsys):
    (chain / "chain.yaml").write_text(CHAIN.replace("{t: 0.3}", "{t: 0.3, weight: 2}"))
    assert main(["merge", "chain.yaml", "out", "--quiet"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        "modelfuse: warning: chain.yaml: stage 'b' (document 2): parameters: 'weight' is "
        "ignored: merge method 'slerp' has no such parameter, and mergekit 0.1.5 ignores it "
        "too; remove it (parameters of 'slerp': t)"
    ]
