"""Vocabulary merges end to end: tiny Llamas with different tokenizers through `modelfuse merge`.

The output reloads with AutoTokenizer and AutoModelForCausalLM, runs, and every
output token's embedding and head rows equal the formula written out here:
the method applied to each model's row of the token, where a model lacking
the token contributes mergekit 0.1.5's fill row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.cli import main
from modelfuse.vocabulary import CHAT_TEMPLATES

from ._tiny import SPECIAL, WORDS, tiny_llama

IM = ["<|im_start|>", "<|im_end|>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHATML_LIKE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

# Output vocabulary of the union: the base's 11 tokens, then bird (a), fish (b),
# <|tool|> (a), <|eot_id|> (b).
UNION = SPECIAL + WORDS + IM + ["bird", "fish", "<|tool|>", "<|eot_id|>"]
BASE_ROWS = list(range(11)) + [None] * 4
A_ROWS = list(range(9)) + [10, 11, 9, None, 12, None]
B_ROWS = [0, 1, 2, 8, 7, 6, 5, 4, 3, None, None, None, 9, None, 10]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base; a adds bird and <|tool|>; b reverses the words, adds fish and <|eot_id|>, ties its head."""
    root = tmp_path_factory.mktemp("models")
    return {
        "base": tiny_llama(root / "base", SPECIAL + WORDS, IM, seed=0, chat_template=CHATML_LIKE),
        "a": tiny_llama(
            root / "a",
            SPECIAL + WORDS + ["bird"],
            IM + ["<|tool|>"],
            seed=1,
            chat_template="{{ 'a' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        ),
        "b": tiny_llama(
            root / "b",
            SPECIAL + WORDS[::-1] + ["fish"],
            ["<|eot_id|>"],
            seed=2,
            tie=True,
            chat_template="{{ 'a' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        ),
    }


def _weights(models):
    w = {k: load_file(v / "model.safetensors") for k, v in models.items()}
    w["b"][HEAD] = w["b"][EMBED]  # tied
    return w


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _merge(tmp_path, text, *extra):
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    code = main(["merge", str(config), str(out), "--quiet", "--threads", "2", *extra])
    return code, out


def _check_loads_and_runs(out, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get) == tokens
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer(" ".join(tokens[3:]), return_tensors="pt").input_ids
    assert ids.max().item() == len(tokens) - 1
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (
        1,
        ids.shape[1],
        json.loads((out / "config.json").read_text())["vocab_size"],
    )
    assert torch.isfinite(logits).all()
    return tokenizer


def _fill(t, w, rows, base="base"):
    """mergekit's fill row of output token t (models that lack it), by the rules written out."""
    have = [m for m in rows if rows[m][t] is not None]
    if len(have) == 1:
        return lambda name: w[have[0]][name][rows[have[0]][t]]
    if not have:
        return lambda name: torch.zeros(32)
    if base in have:
        return lambda name: w[base][name][rows[base][t]]
    return lambda name: sum(w[m][name][rows[m][t]] for m in have) / len(have)


def test_union_linear_rows_are_the_weighted_mean_of_each_models_row(models, tmp_path):
    weights = {"base": 1.0, "a": 2.0, "b": 3.0}
    text = (
        "merge_method: linear\n"
        f"base_model: {models['base']}\n"
        "models:\n"
        + "".join(
            f"  - model: {models[m]}\n    parameters: {{weight: {weights[m]}}}\n" for m in weights
        )
        + "tokenizer_source: union\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    _check_loads_and_runs(out, UNION)
    merged = load_file(out / "model.safetensors")
    w = _weights(models)
    rows = {"base": BASE_ROWS, "a": A_ROWS, "b": B_ROWS}
    for name in (EMBED, HEAD):
        assert merged[name].shape == (15, 32)
        for t in range(15):
            fill = _fill(t, w, rows)
            parts = [
                weights[m] * (w[m][name][rows[m][t]] if rows[m][t] is not None else fill(name))
                for m in weights
            ]
            expected = sum(parts) / sum(weights.values())
            torch.testing.assert_close(merged[name][t], expected, rtol=1e-6, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 15
    # The other tensors are merged as usual.
    norm = "model.layers.1.mlp.down_proj.weight"
    expected = sum(weights[m] * w[m][norm] for m in weights) / 6
    torch.testing.assert_close(merged[norm], expected, rtol=1e-6, atol=1e-6)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_LIKE  # the base tokenizer's, kept


def _row(w, rows, m, name, t):
    """Model m's aligned row of output token t: its own, else the fill row."""
    if rows[m][t] is not None:
        return w[m][name][rows[m][t]]
    return _fill(t, w, rows)(name)


def test_model_source_with_task_arithmetic(models, tmp_path):
    text = (
        "merge_method: task_arithmetic\n"
        f"base_model: {models['base']}\n"
        f"models:\n  - model: {models['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: 1.0}}\n"
        f"tokenizer_source: model:{models['b']}\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    tokens = SPECIAL + WORDS[::-1] + ["fish", "<|eot_id|>"]
    _check_loads_and_runs(out, tokens)
    merged = load_file(out / "model.safetensors")
    w = _weights(models)
    # Rows of b's tokens in each model (None: lacks it).
    rows = {
        "base": [0, 1, 2, 8, 7, 6, 5, 4, 3, None, None],
        "a": [0, 1, 2, 8, 7, 6, 5, 4, 3, None, None],
        "b": list(range(11)),
    }
    for name in (EMBED, HEAD):
        for t in range(11):
            base, a, b = (_row(w, rows, m, name, t) for m in ("base", "a", "b"))
            expected = base + 0.5 * (a - base) + 1.0 * (b - base)
            torch.testing.assert_close(merged[name][t], expected, rtol=1e-6, atol=1e-6)


def test_tokens_force_model_token_and_zero_sources(models, tmp_path):
    text = (
        "merge_method: linear\n"
        f"models: [{models['a']}, {models['b']}]\n"
        "tokenizer:\n"
        "  source: union\n"
        "  tokens:\n"
        f"    <|im_start|>: {{source: {models['a']}}}\n"
        f"    cat: {{source: {models['b']}, force: true}}\n"
        f"    <|new|>: {{source: {{kind: model_token, model: {models['a']}, token: bird}}}}\n"
        "    <|eot_id|>: {source: {kind: zero}}\n"
        "  pad_to_multiple_of: 10\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    # a's vocabulary (the first model's tokenizer is the base), b's fish and <|eot_id|>, <|new|>.
    tokens = SPECIAL + WORDS + ["bird"] + IM + ["<|tool|>", "fish", "<|eot_id|>", "<|new|>"]
    tokenizer = _check_loads_and_runs(out, tokens)
    merged = load_file(out / "model.safetensors")
    w = _weights(models)
    ids = tokenizer.get_vocab()
    a_emb, b_emb = w["a"][EMBED], w["b"][EMBED]
    e = merged[EMBED]
    assert e.shape == (20, 32)

    def close(x, y):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)

    close(e[ids["the"]], (a_emb[3] + b_emb[8]) / 2)  # both have it: the mean of their rows
    close(e[ids["cat"]], b_emb[7])  # forced: both models give b's "cat" (b's row 7)
    close(e[ids["<|im_start|>"]], a_emb[10])  # b lacks it: a's row, as named
    close(e[ids["bird"]], a_emb[9])  # only a has it: a's row for both
    close(e[ids["<|new|>"]], a_emb[9])  # model_token: a's "bird"
    close(e[ids["<|eot_id|>"]], b_emb[10] / 2)  # b's own row, zeros for a
    close(e[ids["fish"]], b_emb[9])  # only b has it
    close(e[16:], e[:16].mean(dim=0).expand(4, -1))  # padding: the mean rows (linear: merged mean)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 20


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("chatml", CHAT_TEMPLATES["chatml"]),
        ("auto", "{{ 'a' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        (
            "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
            "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
        ),
    ],
)
def test_chat_template_lands_in_tokenizer_config(models, tmp_path, value, expected):
    from transformers import AutoTokenizer

    text = (
        "merge_method: linear\n"
        f"base_model: {models['base']}\n"
        f"models: [{models['base']}, {models['a']}, {models['b']}]\n"
        "tokenizer_source: union\n"
        f"chat_template: {json.dumps(value)}\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == expected
    assert AutoTokenizer.from_pretrained(out).chat_template == expected


def test_chat_template_without_a_vocabulary_merge_rewrites_the_base_tokenizer(models, tmp_path):
    text = (
        "merge_method: linear\n"
        f"models: [{models['base']}, {models['base']}]\n"
        "chat_template: llama3\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATES["llama3"]
    assert not (out / "chat_template.jinja").exists()
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged[EMBED], load_file(models["base"] / "model.safetensors")[EMBED])


def test_base_source_with_identical_tokenizers_gives_the_plain_merge(models, tmp_path):
    text = f"merge_method: linear\nmodels: [{models['base']}, {models['base']}]\n"
    (tmp_path / "plain").mkdir()
    assert _merge(tmp_path / "plain", text)[0] == 0
    code, out = _merge(tmp_path, text + "tokenizer_source: base\n")
    assert code == 0
    plain = load_file(tmp_path / "plain" / "out" / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert plain.keys() == merged.keys() and all(torch.equal(plain[k], merged[k]) for k in plain)


def _bad(tmp_path, models, capsys, text):
    capsys.readouterr()  # what building the models printed
    before = {k: _snapshot(v) for k, v in models.items()}
    code, out = _merge(tmp_path, text)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("modelfuse: error:") and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]
    assert {k: _snapshot(v) for k, v in models.items()} == before
    return err


def test_unknown_chat_template_name(models, tmp_path, capsys):
    err = _bad(
        tmp_path,
        models,
        capsys,
        f"merge_method: linear\nmodels: [{models['a']}, {models['b']}]\n"
        "tokenizer_source: union\nchat_template: chatml2\n",
    )
    assert "chat_template: unknown chat template 'chatml2'" in err and "llama3" in err


def test_model_source_not_in_the_merge(models, tmp_path, capsys):
    err = _bad(
        tmp_path,
        models,
        capsys,
        f"merge_method: linear\nmodels: [{models['a']}, {models['b']}]\n"
        f"tokenizer_source: model:{models['base']}\n",
    )
    assert f"tokenizer_source: '{models['base']}' is not a model of the merge" in err


def test_token_source_not_in_the_merge(models, tmp_path, capsys):
    err = _bad(
        tmp_path,
        models,
        capsys,
        f"merge_method: linear\nmodels: [{models['a']}, {models['b']}]\n"
        f"tokenizer:\n  tokens:\n    <|x|>: {{source: {models['base']}}}\n",
    )
    assert "tokenizer.tokens.'<|x|>'.source" in err and "is not a model merged into" in err


def test_model_without_tokenizer_files(models, tmp_path, capsys):
    bare = tiny_llama(
        tmp_path.parent / f"{tmp_path.name}-bare", SPECIAL + WORDS, seed=4, tokenizer=False
    )
    err = _bad(
        tmp_path,
        models,
        capsys,
        f"merge_method: linear\nmodels: [{models['a']}, {bare}]\ntokenizer_source: union\n",
    )
    assert "models[1].model" in err and "has no tokenizer files" in err


def test_both_tokenizer_keys(models, tmp_path, capsys):
    err = _bad(
        tmp_path,
        models,
        capsys,
        f"merge_method: linear\nmodels: [{models['a']}, {models['b']}]\n"
        "tokenizer_source: union\ntokenizer: {source: base}\n",
    )
    assert "both tokenizer_source and tokenizer" in err


def test_method_reading_statistics_cannot_merge_vocabularies(models, tmp_path, capsys):
    stats = {}
    for m in ("a", "b"):
        path = tmp_path.parent / f"{tmp_path.name}-{m}.safetensors"
        save_file({EMBED: torch.ones(12, 32)}, path)
        stats[m] = path
    err = _bad(
        tmp_path,
        models,
        capsys,
        "merge_method: fisher\nmodels:\n"
        f"  - {{model: {models['a']}, statistics: {stats['a']}}}\n"
        f"  - {{model: {models['b']}, statistics: {stats['b']}}}\n"
        "tokenizer_source: union\n",
    )
    assert "fisher" in err and "tokenizer_source" in err


def test_architecture_without_a_known_embedding(models, tmp_path, capsys):
    odd = []
    for i in range(2):
        folder = tmp_path.parent / f"{tmp_path.name}-odd{i}"
        folder.mkdir()
        save_file({"encoder.tokens.weight": torch.zeros(11, 4)}, folder / "model.safetensors")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).write_bytes((models["base"] / f).read_bytes())
        odd.append(folder)
    err = _bad(
        tmp_path,
        models,
        capsys,
        f"merge_method: linear\nmodels: [{odd[0]}, {odd[1]}]\ntokenizer_source: union\n",
    )
    assert "no token embedding found" in err and "model.embed_tokens.weight" in err


def test_rows_merged_in_small_blocks_equal_the_whole_tensor_merge(models, tmp_path, monkeypatch):
    import modelfuse.merge.schedule as schedule

    text = (
        "merge_method: ties\n"
        f"base_model: {models['base']}\n"
        f"models:\n  - model: {models['a']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: 0.7, density: 0.7}}\n"
        "tokenizer_source: union\n"
    )
    (tmp_path / "whole").mkdir()
    assert _merge(tmp_path / "whole", text)[0] == 0
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 64)  # blocks of 2 rows of 32
    from modelfuse.vocabulary import AlignedSource

    read, blocks_read = AlignedSource.read_rows, []

    def recording(self, name, start, stop):
        blocks_read.append((name, start, stop))
        return read(self, name, start, stop)

    monkeypatch.setattr(AlignedSource, "read_rows", recording)
    code, out = _merge(tmp_path, text, "--threads", "1")
    assert code == 0
    assert (EMBED, 0, 2) in blocks_read and (HEAD, 14, 15) in blocks_read
    whole = load_file(tmp_path / "whole" / "out" / "model.safetensors")
    blocks = load_file(out / "model.safetensors")
    for name in (EMBED, HEAD):
        assert torch.equal(whole[name], blocks[name])
    _check_loads_and_runs(out, UNION)


def test_embedding_rows_equal_the_method_on_the_aligned_rows(models, tmp_path):
    from modelfuse.merge import merge_state_dicts
    from modelfuse.vocabulary import (
        TokenizerSettings,
        align_tensors,
        build_vocabulary,
        load_tokenizer,
        plan_rows,
    )

    text = (
        "merge_method: ties\n"
        f"base_model: {models['base']}\n"
        f"models:\n  - model: {models['a']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: 0.7, density: 0.7}}\n"
        "tokenizer_source: union\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    # The same rows built here from the pieces: the union, mergekit's rules, then TIES.
    labels = ["base", "a", "b"]
    tokenizers = {m: load_tokenizer(models[m]) for m in labels}
    w = _weights(models)
    vocabulary = build_vocabulary(
        tokenizers,
        {m: 11 if m != "a" else 13 for m in labels},
        source=TokenizerSettings().source,
        base="base",
    )
    plan = plan_rows(vocabulary, labels, base="base")
    merged = load_file(out / "model.safetensors")
    for name in (EMBED, HEAD):
        aligned = align_tensors(plan, {m: w[m][name] for m in labels})
        expected = merge_state_dicts(
            "ties",
            [{name: aligned["a"]}, {name: aligned["b"]}],
            base={name: aligned["base"]},
            model_parameters=[{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.7}],
        )[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


def test_slices_take_the_embedding_from_the_first_slice_and_the_head_from_the_last(
    models, tmp_path
):
    text = (
        "merge_method: passthrough\n"
        "slices:\n"
        f"  - sources: [{{model: {models['a']}, layer_range: [0, 1]}}]\n"
        f"  - sources: [{{model: {models['b']}, layer_range: [1, 2]}}]\n"
        "tokenizer_source: union\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    # The first model (a) is the tokenizer's base: a's 13 tokens, then fish and <|eot_id|>.
    tokens = SPECIAL + WORDS + ["bird"] + IM + ["<|tool|>", "fish", "<|eot_id|>"]
    tokenizer = _check_loads_and_runs(out, tokens)
    merged = load_file(out / "model.safetensors")
    w = _weights(models)
    ids = tokenizer.get_vocab()
    # The embedding is a's alone: its own rows, b's tokens are in no model of the slice: zeros.
    assert torch.equal(merged[EMBED][ids["cat"]], w["a"][EMBED][4])
    assert torch.equal(merged[EMBED][ids["fish"]], torch.zeros(32))
    # The head is b's alone (tied: its embedding): a's tokens b lacks are zeros.
    assert torch.equal(merged[HEAD][ids["cat"]], w["b"][EMBED][7])
    assert torch.equal(merged[HEAD][ids["fish"]], w["b"][EMBED][9])
    assert torch.equal(merged[HEAD][ids["bird"]], torch.zeros(32))


def test_the_written_configuration_merges_the_same_model_again(models, tmp_path, monkeypatch):
    # Paths relative to the configuration's folder: modelfuse.yaml makes them absolute.
    a, b = (os.path.relpath(models[m], tmp_path) for m in ("a", "b"))
    text = (
        "merge_method: linear\n"
        f"models: [{a}, {b}]\n"
        "tokenizer:\n"
        f"  source: model:{b}\n"
        f"  tokens: {{<|new|>: {{source: {{kind: model_token, model: {a}, token: bird}}}}}}\n"
        "chat_template: alpaca\n"
    )
    code, out = _merge(tmp_path, text)
    assert code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = tmp_path / "again"
    assert main(["merge", str(out / "modelfuse.yaml"), str(again), "--quiet"]) == 0
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
