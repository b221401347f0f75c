"""``modelfuse merge`` and ``modelfuse methods`` through the command line.

Bad configurations: exit 2, one line (or one line per problem), nothing written,
inputs untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.cli import main
from modelfuse.errors import ConfigError
from modelfuse.merge.config import load_config
from modelfuse.merge.registry import METHODS
from modelfuse.statistics.storage import save as save_statistics

RUN = [sys.executable, "-c", "import sys; from modelfuse.cli import main; sys.exit(main(sys.argv[1:]))"]


def _models(tmp_path: Path, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"layers.0.w": torch.full((3,), float(i)), "head": torch.ones(2) * i}, path)
        paths.append(path)
    return paths


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def test_merge_writes_model_and_prints_summary(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1}}\n",
    )
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "merged 2 tensors" in out and "peak memory" in out
    merged = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(merged["layers.0.w"], torch.full((3,), 0.25))


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: linear" in out and "layers.0.w [3] float32 merge" in out
    assert not (tmp_path / "out").exists()


def test_bad_config_is_one_line_exit_2(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: ties_plus\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modelfuse: error:") and "ties_plus" in err and "valid methods" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_not_yaml(tmp_path, capsys):
    config = _yaml(tmp_path, "merge_method: [linear\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    (tmp_path / "out").mkdir()
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0


def test_bad_shard_size(tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    args = ["merge", str(config), str(tmp_path / "out"), "--quiet", "--shard-size", "lots"]
    assert main(args) == 2
    assert "lots" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_methods_lists_parameters_from_the_declaration(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "linear" in listing and "task_arithmetic" in listing
    assert main(["methods", "task_arithmetic"]) == 0
    detail = capsys.readouterr().out
    assert "lambda" in detail and "per model" in detail and "base model: required" in detail
    assert main(["methods", "nope"]) == 2


def test_subprocess_end_to_end(tmp_path):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    done = subprocess.run(
        [*RUN, "merge", str(config), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "merged 2 tensors" in done.stdout
    failed = subprocess.run(
        [*RUN, "merge", str(tmp_path / "missing.yaml"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"modelfuse: error: {tmp_path / 'missing.yaml'}: no such configuration file; "
        "give the path of a YAML file"
    ]


TENSORS = ("model.layers.0.w", "model.layers.1.w", "head")


def _seeded_models(folder: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        path = folder / f"m{i}.safetensors"
        save_file({name: torch.randn(3, generator=g) for name in TENSORS}, path)
        paths.append(path)
    return paths


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(args: list[str], capsys: pytest.CaptureFixture[str], folder: Path, *, lines: int = 1) -> str:
    """Run ``modelfuse ARGS``; check exit 2, one error line (plus ``lines - 1`` problem
    lines), no traceback, and nothing written or changed under ``folder``."""
    before = _snapshot(folder)
    names = sorted(os.listdir(folder))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    printed = err.strip().splitlines()
    assert len(printed) == lines, err
    assert printed[0].startswith("modelfuse: error:")
    assert sum(line.startswith("modelfuse: error:") for line in printed) == 1
    assert sorted(os.listdir(folder)) == names  # no output, no temporary folder
    assert _snapshot(folder) == before  # inputs untouched
    return err


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding three models m0..m2, the working directory of the test."""
    _seeded_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config(folder: Path, text: str) -> str:
    (folder / "merge.yaml").write_text(text)
    return str(folder / "merge.yaml")


def _merge(folder: Path, text: str, *extra: str) -> list[str]:
    return ["merge", _config(folder, text), str(folder / "out"), "--quiet", *extra]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        "{a: " * 100_000 + "1" + "}" * 100_000,
        "merge_method: linear\nmodels:\n" + "  " + "- " * 5000 + "m0.safetensors\n",
    ],
    ids=["lists", "mappings", "block-sequences"],
)
def test_deeply_nested_yaml(work, capsys, text):
    err = refused(_merge(work, text), capsys, work)
    assert "nesting deeper than 64 levels" in err


def test_alias_bomb_is_refused_quickly(work, capsys):
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, 9):
        name, previous = chr(ord("a") + i), chr(ord("a") + i - 1)
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]\n"
    text += "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n"
    assert len(text) < 2000  # 9**9 = 387 million strings once expanded
    err = refused(_merge(work, text), capsys, work)
    assert "aliases expand the document beyond 10000 nodes" in err


def test_alias_to_its_own_collection(work, capsys):
    err = refused(_merge(work, "merge_method: linear\nmodels: &m [m0.safetensors, *m]\n"), capsys, work)
    assert "an alias refers to the collection that holds it" in err


def test_aliases_nesting_deeper_than_the_limit(work, capsys):
    text = "a0: &a0 " + "[" * 50 + "1" + "]" * 50 + "\n"
    for i in range(1, 100):
        text += f"a{i}: &a{i} " + "[" * 50 + f"*a{i - 1}" + "]" * 50 + "\n"
    err = refused(_merge(work, text), capsys, work)
    assert "aliases nest the document deeper than 64 levels" in err


def test_a_plain_alias_still_works(work, capsys):
    text = (
        "merge_method: linear\nmodels:\n"
        "  - {model: m0.safetensors, parameters: &p {weight: 1.0}}\n"
        "  - {model: m1.safetensors, parameters: *p}\n"
    )
    assert main(_merge(work, text)) == 0
    a, b = load_file(work / "m0.safetensors"), load_file(work / "m1.safetensors")
    merged = load_file(work / "out" / "model.safetensors")
    for name in TENSORS:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2)


@pytest.mark.parametrize(
    ("bound", "expected"),
    [
        ("1e30", "layer_range: 1e+30 is not a layer index"),
        ("10**30", "layer_range.1"),
        ("9" * 5000, "an integer of 5000 digits is too large"),
        ("3", "layer_range [0, 3] is not within the model's 2 layers"),
    ],
    ids=["1e30", "10**30", "5000-digits", "past-the-end"],
)
def test_layer_range_beyond_the_model(work, capsys, bound, expected):
    text = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: m0.safetensors, layer_range: [0, {bound}]}}]\n"
    )
    err = refused(_merge(work, text), capsys, work)
    assert expected in err and len(err) < 400


def test_huge_integer_weight(work, capsys):
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - {{model: m0.safetensors, parameters: {{weight: 1{'0' * 10000}}}}}\n"
        "  - m1.safetensors\n"
    )
    err = refused(_merge(work, text), capsys, work)
    assert "an integer of 10001 digits is too large" in err and len(err) < 400


def test_density_written_as_a_power(work, capsys):
    text = (
        "merge_method: ties\nbase_model: m0.safetensors\n"
        "models: [m1.safetensors, m2.safetensors]\nparameters: {density: 10**400}\n"
    )
    err = refused(_merge(work, text), capsys, work)
    assert "density" in err and "'10**400'" in err and len(err) < 400


def test_unknown_user_in_a_model_path(work, capsys):
    text = "merge_method: linear\nmodels: [~nosuchuser-modelfuse/model, m1.safetensors]\n"
    err = refused(_merge(work, text), capsys, work)
    assert "no such user 'nosuchuser-modelfuse'" in err and "models[0].model" in err


def test_scientific_notation_is_a_number(work):
    text = (
        "merge_method: linear\nmodels:\n"
        "  - {model: m0.safetensors, parameters: {weight: 5e-1}}\n"
        "  - {model: m1.safetensors, parameters: {weight: 1E+0}}\n"
    )
    assert main(_merge(work, text)) == 0
    a, b = load_file(work / "m0.safetensors"), load_file(work / "m1.safetensors")
    merged = load_file(work / "out" / "model.safetensors")
    for name in TENSORS:
        torch.testing.assert_close(merged[name], (0.5 * a[name] + 1.0 * b[name]) / 1.5)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "merge_method: linear\nmodels:\n  - {model: m0.safetensors, parameters: {weight: .nan}}\n"
            "  - m1.safetensors\n",
            "'weight': nan",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: m0.safetensors\nmodels: [m1.safetensors]\n"
            "parameters: {lambda: .inf}\n",
            "'lambda': inf",
        ),
        (
            "merge_method: ties\nbase_model: m0.safetensors\nmodels: [m1.safetensors]\n"
            "parameters: {density: [0.5, -.inf]}\n",
            "'density': -inf",
        ),
        (
            "merge_method: slerp\nbase_model: m0.safetensors\nmodels: [m1.safetensors]\n"
            "parameters: {t: [{filter: mlp, value: .nan}, {value: 0.5}]}\n",
            "'t': nan",
        ),
        (
            "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n"
            "patches: [{patch: P, scale: .nan}]\n",
            "patches.0.scale: Input should be a finite number",
        ),
    ],
    ids=["weight", "lambda", "density", "t", "patch-scale"],
)
def test_non_finite_values_name_the_key(work, capsys, text, key):
    err = refused(_merge(work, text), capsys, work)
    assert key in err


def _fisher_config(work: Path, first: str, method: str = "fisher") -> str:
    return (
        f"merge_method: {method}\nmodels:\n"
        f"  - {{model: m0.safetensors, statistics: {first}}}\n"
        "  - {model: m1.safetensors, statistics: f1.safetensors}\n"
    )


def _fisher(work: Path, name: str, tensors: dict[str, torch.Tensor], kind: str = "fisher") -> None:
    save_statistics(tensors, work / name, kind=kind, n_examples=4)


def test_fisher_statistics_with_nan(work, capsys):
    ones = {name: torch.ones(3) for name in TENSORS}
    _fisher(work, "f1.safetensors", ones)
    _fisher(work, "bad.safetensors", {**ones, "model.layers.1.w": torch.tensor([1.0, float("inf"), 1.0])})
    err = refused(_merge(work, _fisher_config(work, "bad.safetensors")), capsys, work)
    assert "bad.safetensors: statistics tensor model.layers.1.w holds NaN or inf" in err


def test_statistics_matching_no_tensor(work, capsys):
    _fisher(work, "f1.safetensors", {name: torch.ones(3) for name in TENSORS})
    _fisher(work, "other.safetensors", {"encoder.w": torch.ones(3)})
    err = refused(_merge(work, _fisher_config(work, "other.safetensors")), capsys, work)
    assert "other.safetensors: none of its 1 tensor names is a tensor of the model" in err


def test_gram_file_given_to_fisher(work, capsys):
    _fisher(work, "f1.safetensors", {name: torch.ones(3) for name in TENSORS})
    _fisher(work, "gram.safetensors", {"head": torch.eye(3)}, kind="gram")
    err = refused(_merge(work, _fisher_config(work, "gram.safetensors")), capsys, work)
    assert "gram.safetensors: holds Gram matrices" in err
    assert "compute them with `modelfuse statistics fisher`" in err


def test_fisher_file_given_to_regmean(work, capsys):
    _fisher(work, "f1.safetensors", {name: torch.ones(3) for name in TENSORS}, kind="gram")
    _fisher(work, "fisher.safetensors", {name: torch.ones(3) for name in TENSORS})
    err = refused(
        _merge(work, _fisher_config(work, "fisher.safetensors", method="regmean")), capsys, work
    )
    assert "fisher.safetensors: holds Fisher diagonals" in err
    assert "needs Gram matrices: compute them with `modelfuse statistics gram`" in err


def _many_problems(work: Path) -> str:
    (work / "out").mkdir()
    _fisher(work, "f1.safetensors", {name: torch.ones(3) for name in TENSORS}, kind="gram")
    return (
        "merge_method: fisher\nmodels:\n"
        "  - {model: m0.safetensors, statistics: f1.safetensors, parameters: {weight: -1}}\n"
        "  - {model: m1.safetensors, statistics: f1.safetensors, parameters: {colour: 2}}\n"
        "parameters: {fisher_floor: -3}\n"
    )


MANY = [
    "out: already exists; choose another output folder, or pass --overwrite",
    "models[0].statistics f1.safetensors: holds Gram matrices",
    "models[1].statistics f1.safetensors: holds Gram matrices",
    "m1.safetensors: parameters: unknown parameter 'colour' for merge method 'fisher'",
    "m0.safetensors: tensor head (and 2 more tensors): weight: Input should be "
    "greater than 0 (got -1)",
    "tensor head (and 2 more tensors): fisher_floor: Input should be greater than "
    "or equal to 0 (got -3)",
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_every_problem_is_reported_at_once(work, capsys, dry_run):
    text = _many_problems(work)
    args = ["merge", _config(work, text), "out", "--quiet", *(["--dry-run"] if dry_run else [])]
    err = refused(args, capsys, work, lines=1 + len(MANY))
    lines = err.strip().splitlines()
    assert lines[0] == f"modelfuse: error: {len(MANY)} problems:"
    for expected in MANY:
        assert sum(line.strip().startswith(expected) for line in lines[1:]) == 1, expected


def test_missing_model_and_unknown_parameter_together(work, capsys):
    text = (
        "merge_method: ties\nbase_model: m0.safetensors\n"
        "models: [m1.safetensors, missing.safetensors]\nparameters: {densty: 3}\n"
    )
    err = refused(_merge(work, text, "--dry-run"), capsys, work, lines=3)
    assert "missing.safetensors: no such file or folder" in err
    assert "unknown parameter 'densty' for merge method 'ties'" in err


def test_a_missing_model_does_not_hide_out_of_range_values(work, capsys):
    """Plain values apply to every tensor, so they are checked before the models are read."""
    text = (
        "merge_method: ties\nbase_model: m0.safetensors\n"
        "models:\n"
        "  - {model: m1.safetensors, parameters: {density: 1.5, weight: [0, 9]}}\n"
        "  - missing.safetensors\n"
        "parameters: {densty: 3, lambda: 0.5}\n"
    )
    err = refused(_merge(work, text, "--dry-run"), capsys, work, lines=4)
    lines = err.strip().splitlines()
    assert lines[0] == "modelfuse: error: 3 problems:"
    assert "missing.safetensors: no such file or folder" in err
    assert "unknown parameter 'densty' for merge method 'ties'" in err
    assert (
        "m1.safetensors: parameters: density: Input should be less than or equal to 1 (got 1.5)"
        in err
    )


def _inputs_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A model folder, a model file, and a configuration merging them, in three places."""
    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(3, generator=g) for n in TENSORS}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    other = tmp_path / "models" / "other.safetensors"
    save_file({n: torch.randn(3, generator=g) for n in TENSORS}, other)
    configs = tmp_path / "configs"
    configs.mkdir()
    config = configs / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels: [{folder}, {other}]\n")
    return folder, other, config


@pytest.mark.parametrize(
    ("target", "relation"),
    [
        ("models/base", "is the input model"),
        ("models/other.safetensors", "is the input model"),
        ("models", "contains the input model"),
        ("configs", "is the folder of the configuration"),
        ("configs/merge.yaml", "is the configuration file"),
        ("link", "is the input model"),
        (".", "contains the input model"),
    ],
    ids=[
        "model-folder",
        "model-file",
        "parent-of-models",
        "config-folder",
        "config-file",
        "symlink",
        "cwd",
    ],
)
def test_overwrite_never_replaces_an_input(tmp_path, capsys, monkeypatch, target, relation):
    folder, _, config = _inputs_folder(tmp_path)
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    err = refused(["merge", str(config), target, "--overwrite", "--quiet"], capsys, tmp_path)
    assert relation in err and "would destroy an input" in err


def test_overwrite_never_replaces_statistics_or_patches(work, capsys):
    ones = {name: torch.ones(3) for name in TENSORS}
    _fisher(work, "f1.safetensors", ones)
    (work / "stats").mkdir()
    _fisher(work / "stats", "f0.safetensors", ones)
    text = _fisher_config(work, "stats/f0.safetensors")
    args = ["merge", _config(work, text), "stats", "--overwrite", "--quiet"]
    assert "contains the statistics file" in refused(args, capsys, work)
    assert main(["diff", "m0.safetensors", "m1.safetensors", "-o", "patch", "--quiet"]) == 0
    capsys.readouterr()
    text = "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\npatches: [{patch: patch}]\n"
    args = ["merge", _config(work, text), "patch", "--overwrite", "--quiet"]
    assert "is the patch" in refused(args, capsys, work)


def test_overwrite_replaces_a_previous_output(work, capsys):
    text = "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n"
    assert main(_merge(work, text)) == 0
    assert main(_merge(work, text)) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(_merge(work, text, "--overwrite")) == 0


def test_output_as_option_or_argument(work, capsys):
    config = _config(work, "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n")
    assert main(["merge", config, "-o", "a", "--quiet"]) == 0
    assert main(["merge", config, "--out", "b", "--quiet"]) == 0
    assert (work / "a" / "model.safetensors").read_bytes() == (
        work / "b" / "model.safetensors"
    ).read_bytes()
    capsys.readouterr()
    assert "not both" in refused(["merge", config, "c", "-o", "d", "--quiet"], capsys, work)
    assert "missing the output folder" in refused(["merge", config, "--quiet"], capsys, work)


def test_out_of_range_threads_is_a_usage_error(work, capsys):
    config = _config(work, "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n")
    before = _snapshot(work)
    assert main(["merge", config, "out", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "Traceback" not in err
    assert not (work / "out").exists() and _snapshot(work) == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: " + "x" * 10000 + "\nmodels: [m0.safetensors]\n", "unknown merge method"),
        ("merge_method: linear\nmodels: [" + "p" * 10000 + ", m1.safetensors]\n", "File name too long"),
        ("merge_method: linear\nmodels: [m0.safetensors]\ndtype: " + "d" * 10000 + "\n", "unknown dtype"),
        ("merge_method: linear\nmodels: [m0.safetensors]\n" + "k" * 1000 + ": 1\n", "unknown key"),
    ],
    ids=["method", "model-path", "dtype", "key"],
)
def test_long_values_are_cut_in_messages(work, capsys, text, expected):
    err = refused(_merge(work, text), capsys, work)
    assert expected in err and len(err) < 600


def test_a_long_message_keeps_its_end(work, capsys):
    # the list of valid methods, and a fix, come last: a one-line error keeps them
    err = refused(_merge(work, "merge_method: Linear\nmodels: [m0.safetensors]\n"), capsys, work)
    assert err.rstrip().endswith(", ".join(sorted(METHODS)[-3:])), err


def test_thousands_of_unknown_keys_are_counted_not_listed(work, capsys):
    keys = "".join(f"key{i}: 1\n" for i in range(5000))
    text = "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n" + keys
    err = refused(_merge(work, text), capsys, work)
    assert "key0: unknown key" in err and len(err) < 1100  # one line, with the valid keys
    with pytest.raises(ConfigError) as info:
        load_config(work / "merge.yaml")
    message = str(info.value)
    assert "key19: unknown key" in message and "key20:" not in message
    assert "and 4980 more" in message and len(message) < 1500


def test_hundreds_of_problems_list_the_first_fifty(work, capsys):
    settings = ", ".join(f"p{i}: 1" for i in range(200))
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - {{model: m0.safetensors, parameters: {{{settings}}}}}\n"
        "  - missing.safetensors\n"
    )
    err = refused(_merge(work, text), capsys, work, lines=51)
    lines = err.strip().splitlines()
    assert lines[0] == "modelfuse: error: 201 problems:"
    assert lines[-1] == "  and 152 more"


def test_output_under_an_unknown_user(work, capsys):
    config = _config(work, "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n")
    err = refused(["merge", config, "~nosuchuser-modelfuse/out", "--quiet"], capsys, work)
    assert "OUT: '~nosuchuser-modelfuse/out': no such user 'nosuchuser-modelfuse'" in err


def test_unreadable_model_is_one_of_the_problems(work, capsys, monkeypatch):
    import modelfuse.merge.open_inputs as open_inputs

    real = open_inputs.open_checkpoint

    def refuse_m1(path):
        if str(path).endswith("m1.safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(open_inputs, "open_checkpoint", refuse_m1)
    text = "merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\nparameters: {colour: 1}\n"
    err = refused(_merge(work, text, "--dry-run"), capsys, work, lines=3)
    assert "models[1].model: 'm1.safetensors': cannot be read (Permission denied)" in err
    assert "unknown parameter 'colour'" in err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text(""), "the configuration is empty; write merge_method and models"),
        (lambda p: p.write_text("# only a comment\n"), "the configuration is empty"),
        (lambda p: p.mkdir(), "is a folder; give the path of a YAML configuration file"),
    ],
)
def test_an_empty_or_folder_configuration_is_named_as_such(make, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    make(config)
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"modelfuse: error: {config}: {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


# mergekit 0.1.5 parity: names mergekit accepts and ignores, global settings under a model.

IGNORED = [
    (
        "merge_method: model_stock\nbase_model: m0.safetensors\n"
        "models:\n  - {model: m1.safetensors, parameters: {weight: 0.3}}\n  - m2.safetensors\n",
        ["m1.safetensors: parameters: 'weight' is ignored: merge method 'model_stock' has no "
         "such parameter, and mergekit 0.1.5 ignores it too; remove it (parameters of "
         "'model_stock': filter_wise, pairwise_mean)"],
    ),
    (
        "merge_method: task_arithmetic\nbase_model: m0.safetensors\n"
        "models:\n  - {model: m1.safetensors, parameters: {lambda: 3, density: 0.5}}\n"
        "  - m2.safetensors\nparameters: {rescale: true}\n",
        ["parameters: 'rescale' is ignored: merge method 'task_arithmetic' has no such parameter",
         "m1.safetensors: parameters: 'lambda' is ignored: it is a global parameter of merge "
         "method 'task_arithmetic', and mergekit 0.1.5 reads those only from the top-level (or "
         "a slice's) parameters; move it there",
         "m1.safetensors: parameters: 'density' is ignored: merge method 'task_arithmetic'"],
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n"
        "      - {model: m0.safetensors, layer_range: [0, 2]}\n"
        "      - {model: m1.safetensors, layer_range: [0, 2], parameters: {weight: 2}}\n"
        "    residual_weight: 0.5\n",
        ["slices[0]: residual_weight is ignored: mergekit 0.1.5 accepts it and uses it nowhere; "
         "remove it"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), IGNORED, ids=["model_stock", "task_arithmetic", "slices"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_ignored_names_run_with_one_warning_line_each(work, capsys, text, expected, dry_run):
    code = main(_merge(work, text, *(["--dry-run"] if dry_run else [])))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err
    warned = [line for line in err.splitlines() if line.startswith("modelfuse: warning:")]
    assert len(warned) == len(expected), err  # once each, though the merge is planned twice
    for line, start in zip(warned, expected):
        assert line.removeprefix("modelfuse: warning: ").startswith(start)
    assert (work / "out" / "model.safetensors").is_file() != dry_run


def test_a_models_global_setting_gives_the_same_merge_in_either_order(work, capsys):
    text = (
        "merge_method: task_arithmetic\nbase_model: m0.safetensors\n"
        "models:\n  - {model: m1.safetensors, parameters: {lambda: 3}}\n  - m2.safetensors\n"
    )
    swapped = (
        "merge_method: task_arithmetic\nbase_model: m0.safetensors\n"
        "models:\n  - m2.safetensors\n  - {model: m1.safetensors, parameters: {lambda: 3}}\n"
    )
    merged = []
    for number, config in enumerate([text, swapped]):
        args = ["merge", _config(work, config), str(work / f"out{number}"), "--quiet"]
        assert main(args) == 0
        err = capsys.readouterr().err
        assert err.count("'lambda' is ignored") == 1, err
        merged.append(load_file(work / f"out{number}" / "model.safetensors"))
    m0, m1, m2 = (load_file(work / f"m{i}.safetensors") for i in range(3))
    for name in TENSORS:  # lambda 1: m0 + (m1 - m0) + (m2 - m0)
        expected = m0[name] + (m1[name] - m0[name]) + (m2[name] - m0[name])
        for result in merged:
            torch.testing.assert_close(result[name], expected)


def test_a_name_mergekit_would_not_know_is_still_refused(work, capsys):
    text = (
        "merge_method: model_stock\nbase_model: m0.safetensors\n"
        "models: [m1.safetensors, {model: m2.safetensors, parameters: {wieght: 1}}]\n"
    )
    err = refused(_merge(work, text), capsys, work)
    assert "m2.safetensors: parameters: unknown parameter 'wieght' for merge method " in err
    assert "'model_stock'; valid parameters: filter_wise, pairwise_mean" in err


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_float64_is_accepted(work, capsys, key):
    text = f"merge_method: linear\nmodels: [m0.safetensors, m1.safetensors]\n{key}: float64\n"
    assert main(_merge(work, text)) == 0, capsys.readouterr().err
    merged = load_file(work / "out" / "model.safetensors")
    m0, m1 = (load_file(work / f"m{i}.safetensors") for i in range(2))
    for name in TENSORS:
        assert merged[name].dtype == torch.float64
        torch.testing.assert_close(merged[name], ((m0[name] + m1[name]) / 2).double())


def test_a_base_listed_among_the_models_is_used_once_and_said_so(tmp_path, capsys):
    a, b, c = _models(tmp_path, 3)  # tensors filled with 0, 1 and 2
    config = _yaml(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {a}\nmodels: [{a}, {b}, {c}]\n",
    )
    assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"modelfuse: {a} is both base_model and a model; it is used once, as the base\n" in err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    # base 0 + lambda 1 * ((1 - 0) + (2 - 0)): the base adds no zero task vector of its own
    torch.testing.assert_close(merged["layers.0.w"], torch.full((3,), 3.0))


def _folder_model(folder: Path, value: float) -> Path:
    folder.mkdir()
    save_file(
        {f"model.layers.{i}.w": torch.full((10, 10), value + i) for i in range(3)},
        folder / "model.safetensors",
    )
    (folder / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float32"}\n')
    (folder / "tokenizer.json").write_text("{}\n")
    (folder / "special_tokens_map.json").write_text("{}\n")
    return folder


def test_mergekit_command_line_habits(tmp_path, capsys):
    """-j, --out-shard-size (parameters), --no-copy-tokenizer, --no-write-model-card."""
    a = _folder_model(tmp_path / "a", 0.0)
    b = _folder_model(tmp_path / "b", 1.0)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    out = tmp_path / "out"
    args = ["merge", str(config), str(out), "-j", "1", "--out-shard-size", "150",
            "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    assert main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert "tokenizer.json" not in files and "special_tokens_map.json" not in files
    assert "config.json" in files and "README.md" not in files
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 3  # 3 tensors of 100 parameters, at most 150 parameters a shard
    for shard in shards:
        assert sum(t.numel() for t in load_file(shard).values()) <= 150
    assert main(["merge", str(config), str(tmp_path / "out2"), "--quiet"]) == 0
    assert {"tokenizer.json", "special_tokens_map.json", "README.md"} <= {
        p.name for p in (tmp_path / "out2").iterdir()
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out-shard-size", "5X"], "--out-shard-size: expected a positive number of parameters"),
        (["--out-shard-size", "0"], "--out-shard-size: expected a positive number of parameters"),
        (["--out-shard-size", "5B", "--shard-size", "1GB"], "not both"),
    ],
)
def test_bad_out_shard_size(extra, message, tmp_path, capsys):
    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "out").exists()


def test_mergekit_only_options_are_accepted_with_one_line_each(tmp_path, capsys):
    from modelfuse.cli.merge import MERGEKIT_ONLY

    a, b = _models(tmp_path)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    flags = ["--cuda", "--low-cpu-memory", "--lazy-unpickle", "--clone-tensors",
             "--trust-remote-code", "--safe-serialization", "--transformers-cache", "x",
             "--lora-merge-cache", "y", "--lora-merge-dtype", "bfloat16", "--read-to-gpu",
             "--multi-gpu", "--gpu-rich", "--device", "auto", "--async-write",
             "--write-threads", "2", "-vv", "--lazy", "--num-threads", "1"]  # the last: -j
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet", *flags]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"modelfuse: {flag} is mergekit's; {why}" for flag, why in MERGEKIT_ONLY.items()]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_unchanged_config_json_gets_no_empty_note(tmp_path, capsys):
    a = _folder_model(tmp_path / "a", 0.0)
    b = _folder_model(tmp_path / "b", 1.0)
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    assert "config.json: \n" not in capsys.readouterr().err


def test_random_seed_sets_the_drop_masks_seed_and_is_recorded(tmp_path, capsys):
    a = _folder_model(tmp_path / "a", 0.0)
    b = _folder_model(tmp_path / "b", 1.0)
    c = _folder_model(tmp_path / "c", 3.0)
    text = f"merge_method: dare_linear\nbase_model: {a}\nmodels: [{b}, {c}]\n"
    text += "parameters: {density: 0.5}\n"
    config = _yaml(tmp_path, text)
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text(text.replace("{density: 0.5}", "{density: 0.5, random_seed: 7}"))

    def weights(out: str, yaml_file: Path, *extra: str) -> bytes:
        assert main(["merge", str(yaml_file), str(tmp_path / out), "--quiet", *extra]) == 0
        return (tmp_path / out / "model.safetensors").read_bytes()

    by_flag = weights("flag7", config, "--random-seed", "7")
    assert by_flag == weights("config7", seeded)
    assert by_flag != weights("flag8", config, "--random-seed", "8")
    assert "random_seed: 7" in (tmp_path / "flag7" / "modelfuse.yaml").read_text()
    capsys.readouterr()
    args = ["merge", str(seeded), str(tmp_path / "clash"), "--random-seed", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sets random_seed: 7; give the seed once" in err
    # a method without random draws takes the flag and is unchanged by it
    linear = _yaml(tmp_path, f"merge_method: linear\nmodels: [{b}, {c}]\n")
    assert main(["merge", str(linear), str(tmp_path / "lin"), "--quiet", "--random-seed", "3"]) == 0


def test_different_architectures_need_allow_crimes(tmp_path, capsys):
    a = _folder_model(tmp_path / "a", 0.0)
    b = _folder_model(tmp_path / "b", 1.0)
    (a / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (b / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}\n')
    config = _yaml(tmp_path, f"merge_method: linear\nmodels: [{a}, {b}]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "LlamaForCausalLM" in err and "MistralForCausalLM" in err and "--allow-crimes" in err
    assert not (tmp_path / "out").exists()
    args = ["merge", str(config), str(tmp_path / "out"), "--quiet", "--allow-crimes"]
    assert main(args) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(merged["model.layers.0.w"], torch.full((10, 10), 0.5))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "base_model: a\ngate_mode: hidden\nexperts:\n  - source_model: a\n"
            "    positive_prompts: [math]\n",
            "a mergekit-moe configuration (experts, gate_mode), not a merge",
        ),
        (
            "merge_method: linear\nmodels: [a, b]\ntokenizer_source: union\n"
            "tokenizer: {source: base}\n",
            "both tokenizer_source and tokenizer are given; mergekit reads one",
        ),
        (
            "merge_method: linear\nmodels: [a, b]\ntokenizer_source: {model: a, lora: l}\n",
            "tokenizer_source: lora in a model reference is not supported",
        ),
    ],
)
def test_mergekit_files_modelfuse_cannot_run_are_refused_saying_why(text, message, tmp_path, capsys):
    config = _yaml(tmp_path, text)
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "valid keys" not in err
