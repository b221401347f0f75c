"""Every model's row for every output token, against mergekit 0.1.5's rules written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.vocabulary import (
    TokenizerSettings,
    Vocabulary,
    align_rows,
    align_tensors,
    gather_rows,
    padding_row,
    plan_rows,
)

# Output tokens t0..t7 and each model's row of them (-1: the model lacks the token).
#            t0  t1  t2  t3  t4  t5  t6  t7
BASE = [0, 1, 2, 3, -1, -1, -1, 4]
A = [1, 0, 2, -1, 3, 4, -1, -1]
B = [0, 2, -1, 1, 3, -1, -1, 4]
TOKENS = {f"t{i}": i for i in range(8)}
ROWS = {"base": 5, "a": 5, "b": 5}


def _vocabulary() -> Vocabulary:
    vocabs = {
        m: {f"t{i}": r for i, r in enumerate(rows) if r >= 0}
        for m, rows in {"base": BASE, "a": A, "b": B}.items()
    }
    vocabs["a"]["old"] = 3  # not an output token: a's row 3 is also "old" (for model_token)
    rows = {m: np.array(r) for m, r in {"base": BASE, "a": A, "b": B}.items()}
    return Vocabulary(None, dict(TOKENS), 8, rows, vocabs, dict(ROWS))


def _tensors(seed=0, tail=(3,), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn((5, *tail), generator=g).to(dtype) for m in ("base", "a", "b")}


def _tokens(mapping):
    return TokenizerSettings.model_validate({"tokens": mapping}).tokens


def test_default_rules_own_rows_then_donor_base_mean_zero():
    x = _tensors()
    plan = plan_rows(_vocabulary(), ["base", "a", "b"], base="base")
    out = align_tensors(plan, x)
    base, a, b = x["base"], x["a"], x["b"]
    # t0, t1: everyone has them: own rows.
    expected_fill = {
        2: base[2],  # base and a have t2: the base's row
        3: base[3],  # base and b: the base's row
        4: (a[3] + b[3]) / 2,  # a and b, not the base: their mean
        5: a[4],  # only a: a's row
        6: torch.zeros(3),  # nobody: zeros
        7: base[4],  # base and b: the base's row
    }
    for model, rows in (("base", BASE), ("a", A), ("b", B)):
        for t in range(8):
            want = x[model][rows[t]] if rows[t] >= 0 else expected_fill[t]
            torch.testing.assert_close(out[model][t], want, rtol=0, atol=0)
    assert plan.missing == ("t6",)
    assert plan.rules == {
        "own": 2, "named": 0, "donor": 1, "base": 3, "mean": 1, "zero": 1, "forced": 0
    }  # fmt: skip


def test_without_a_base_tokens_two_models_have_take_their_mean():
    x = _tensors(1)
    plan = plan_rows(_vocabulary(), ["base", "a", "b"], base=None)
    out = align_tensors(plan, x)
    torch.testing.assert_close(out["a"][3], (x["base"][3] + x["b"][1]) / 2, rtol=0, atol=0)
    torch.testing.assert_close(out["b"][2], (x["base"][2] + x["a"][2]) / 2, rtol=0, atol=0)


def test_the_rules_draw_only_on_the_models_merged_into_the_tensor():
    x = _tensors(2)
    plan = plan_rows(_vocabulary(), ["a", "b"], base="base")  # the base is not merged here
    out = align_tensors(plan, x)
    assert set(out) == {"a", "b"}
    torch.testing.assert_close(out["b"][2], x["a"][2], rtol=0, atol=0)  # donor: only a
    torch.testing.assert_close(out["a"][7], x["b"][4], rtol=0, atol=0)  # donor: only b
    torch.testing.assert_close(out["a"][6], torch.zeros(3), rtol=0, atol=0)


def test_named_sources_override_the_defaults_and_force_replaces_own_rows():
    x = _tensors(3)
    tokens = _tokens(
        {
            "t2": {"source": "b"},  # b lacks t2: refused below; here t4 instead
        }
    )
    with pytest.raises(ConfigError, match=r"tokenizer.tokens.'t2'.source: model 'b' does not have"):
        plan_rows(_vocabulary(), ["base", "a", "b"], base="base", tokens=tokens)
    tokens = _tokens(
        {
            "t4": {"source": "b"},  # a, b have it, base lacks it: the base gets b's row
            "t5": {"source": {"kind": "zero"}},  # only a has it: the others get zeros
            "t6": {"source": {"kind": "model_token", "model": "a", "token": "old"}},
            "t3": {"source": {"kind": "model_token", "model": "b", "token_id": 0}},
            "t0": {"source": "a", "force": True},  # everyone gets a's row of t0
            "t1": {"source": "b"},  # everyone has t1 and no force: own rows
        }
    )
    plan = plan_rows(_vocabulary(), ["base", "a", "b"], base="base", tokens=tokens)
    out = align_tensors(plan, x)
    base, a, b = x["base"], x["a"], x["b"]
    torch.testing.assert_close(out["base"][4], b[3], rtol=0, atol=0)
    torch.testing.assert_close(out["a"][4], a[3], rtol=0, atol=0)
    torch.testing.assert_close(out["base"][5], torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(out["a"][5], a[4], rtol=0, atol=0)
    for model in ("base", "a", "b"):
        torch.testing.assert_close(out[model][6], a[3], rtol=0, atol=0)  # a's "old"
        torch.testing.assert_close(out[model][0], a[1], rtol=0, atol=0)  # forced
        torch.testing.assert_close(
            out[model][1], x[model][[1, 0, 2][["base", "a", "b"].index(model)]]
        )
    torch.testing.assert_close(out["a"][3], b[0], rtol=0, atol=0)  # token_id 0 of b
    torch.testing.assert_close(out["base"][3], base[3], rtol=0, atol=0)  # base has t3
    assert plan.rules["forced"] == 1 and plan.rules["named"] == 4


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ({"t5": {"source": "./elsewhere"}}, "'./elsewhere' is not a model merged into"),
        ({"t1": {"source": "./elsewhere"}}, "'./elsewhere' is not a model merged into"),
        (
            {"t5": {"source": {"kind": "model_token", "model": "a", "token": "nope"}}},
            "model 'a' has no token 'nope'",
        ),
        (
            {"t5": {"source": {"kind": "model_token", "model": "a", "token_id": 5}}},
            "token_id 5 is not a row of model 'a', which has 5 rows",
        ),
        ({"t5": {}}, "no source, and some models lack the token"),
        ({"t0": {"force": True}}, "no source, and force is set"),
    ],
)
def test_bad_token_settings_are_refused_naming_the_token(tokens, match):
    with pytest.raises(ConfigError, match=match) as info:
        plan_rows(_vocabulary(), ["base", "a", "b"], base="base", tokens=_tokens(tokens))
    assert str(info.value).startswith("tokenizer.tokens.'t")


def test_locate_maps_paths_as_written_to_labels():
    tokens = _tokens({"t5": {"source": "./models/b/"}})
    with pytest.raises(ConfigError, match="does not have the token"):  # located: b lacks t5
        plan_rows(_vocabulary(), ["base", "a", "b"], tokens=tokens, locate={"./models/b/": "b"}.get)


def test_padding_rows_are_each_models_mean_aligned_row():
    x = _tensors(4)
    plan = plan_rows(_vocabulary(), ["base", "a", "b"], base="base", pad_to_multiple_of=5)
    assert (plan.tokens, plan.size) == (8, 10)
    out = align_tensors(plan, x)
    for model in ("base", "a", "b"):
        assert out[model].shape == (10, 3)
        mean = out[model][:8].mean(dim=0)
        torch.testing.assert_close(out[model][8], mean)
        torch.testing.assert_close(out[model][9], mean)
    assert plan_rows(_vocabulary(), ["a"], pad_to_multiple_of=4).size == 8  # already a multiple


def test_blocks_of_rows_equal_the_whole_tensor_in_bfloat16():
    x = _tensors(5, tail=(2, 3), dtype=torch.bfloat16)
    plan = plan_rows(_vocabulary(), ["base", "a", "b"], base="base", pad_to_multiple_of=6)
    whole = align_tensors(plan, x)

    def read(model, rows):
        return x[model][torch.from_numpy(rows)]

    for model in ("base", "a", "b"):
        pad = padding_row(plan, model, read, tail=(2, 3), dtype=torch.bfloat16, block=3)
        pieces = [
            align_rows(
                plan, model, read, s, min(s + 5, 12), tail=(2, 3), dtype=torch.bfloat16, padding=pad
            )
            for s in range(0, 12, 5)
        ]
        assert torch.equal(torch.cat(pieces), whole[model])
        assert whole[model].dtype == torch.bfloat16


def test_inputs_are_not_modified():
    x = _tensors(6)
    before = {k: v.clone() for k, v in x.items()}
    align_tensors(plan_rows(_vocabulary(), ["base", "a", "b"]), x)
    assert all(torch.equal(x[k], before[k]) for k in x)


def test_identity_is_recognised_only_for_the_same_rows_in_the_same_order():
    v = Vocabulary(
        None,
        {"p": 0, "q": 1},
        2,
        {"a": np.array([0, 1]), "b": np.array([1, 0])},
        {},
        {"a": 2, "b": 2},
    )
    plan = plan_rows(v, ["a", "b"])
    assert plan.is_identity("a", 2) and not plan.is_identity("b", 2)
    assert not plan.is_identity("a", 3)  # a's extra row is dropped


@pytest.mark.parametrize("seed", range(4))
def test_gather_rows_returns_the_rows_asked_for_in_any_order(seed):
    rng = np.random.default_rng(seed)
    tensor = torch.arange(200.0).reshape(100, 2)
    rows = rng.integers(0, 100, size=rng.integers(1, 60))
    calls = []

    def read_block(a, b):
        calls.append((a, b))
        return tensor[a:b]

    torch.testing.assert_close(gather_rows(read_block, rows), tensor[torch.from_numpy(rows)])
    assert sum(b - a for a, b in calls) <= 100  # every row read at most once


def test_gather_rows_reads_consecutive_rows_at_once():
    calls = []
    gather_rows(lambda a, b: calls.append((a, b)) or torch.zeros(b - a), np.arange(10, 50))
    assert calls == [(10, 50)]
