"""Router (gate) weights of a mixture of experts, made as mergekit 0.1.5 makes them.

Every layer's router is a matrix with one row per expert; a token goes to the
experts whose rows have the largest dot product with its hidden state. The
rows come from the expert's prompts:

- ``hidden`` (and ``hidden_last``): the base model's hidden state at the
  input of each layer, for the last token of each positive prompt, averaged
  over the prompts (the prompts run as one left-padded batch, each prefixed
  with the BOS token's text). mergekit 0.1.5 runs ``hidden`` this way: it is
  ``hidden_avg`` that averages over the tokens.
- ``hidden_avg``: the same hidden states averaged over every position of the
  padded batch (pad positions included, as mergekit does), then over the
  prompts.
- ``cheap_embed``: the sum of the input embeddings of the prompts' tokens
  (pads masked out), scaled to unit length; the same row for every layer.
  No forward pass.
- ``random``: standard normal draws; ``uniform_random``: uniform on
  ``[-1/sqrt(hidden), 1/sqrt(hidden)]`` (torch.nn.Linear's initialisation).

With negative prompts, their vector is subtracted from the positive one.
Every row is then divided by its L2 norm (at least 1e-8) for the prompt modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import short

__all__ = [
    "GATE_MODES",
    "MAX_TOKENS_PER_PASS",
    "GateMode",
    "cheap_embedding_vector",
    "gate_vectors",
    "get_gate_mode",
    "hidden_state_vector",
    "normalized",
    "prepare_tokenizer",
    "prompt_batches",
    "random_gates",
    "tokenize_prompts",
]

MAX_TOKENS_PER_PASS = 8192
"""Most prompt tokens (prompts times padded length) run through the model at once."""


@dataclass(frozen=True)
class GateMode:
    """How one ``gate_mode`` makes the router rows.

    Attributes
    ----------
    name : str
        The configuration's name for it.
    source : {"hidden", "cheap_embed", "random"}
        What the rows come from.
    reduce : {"last", "mean"}
        For ``source="hidden"``: the last token's hidden state or the mean over positions.
    uniform : bool
        For ``source="random"``: uniform draws instead of normal ones.
    summary : str
        One line for people.
    """

    name: str
    source: Literal["hidden", "cheap_embed", "random"]
    reduce: Literal["last", "mean"] = "last"
    uniform: bool = False
    summary: str = ""

    @property
    def needs_prompts(self) -> bool:
        """Whether every expert must give positive prompts."""
        return self.source != "random"


GATE_MODES: dict[str, GateMode] = {
    "hidden": GateMode(
        "hidden",
        "hidden",
        "last",
        summary="base model's hidden states at the last token of each prompt, per layer",
    ),
    "hidden_last": GateMode(
        "hidden_last", "hidden", "last", summary="the same as hidden (mergekit's alias)"
    ),
    "hidden_avg": GateMode(
        "hidden_avg",
        "hidden",
        "mean",
        summary="base model's hidden states averaged over the prompt positions, per layer",
    ),
    "cheap_embed": GateMode(
        "cheap_embed",
        "cheap_embed",
        summary="sum of the prompts' token embeddings, the same for every layer",
    ),
    "random": GateMode("random", "random", summary="standard normal draws (seeded)"),
    "uniform_random": GateMode(
        "uniform_random",
        "random",
        uniform=True,
        summary="uniform draws in +-1/sqrt(hidden size), nn.Linear's initialisation (seeded)",
    ),
}
"""Every ``gate_mode`` mergekit 0.1.5 knows, by name."""


def get_gate_mode(name: str) -> GateMode:
    """The gate mode called ``name``; an unknown name lists the valid ones.

    Examples
    --------
    >>> get_gate_mode("cheap_embed").needs_prompts
    True
    >>> get_gate_mode("hiden")
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: gate_mode: unknown mode 'hiden'; valid: hidden, hidden_last, \
hidden_avg, cheap_embed, random, uniform_random
    """
    try:
        return GATE_MODES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"gate_mode: unknown mode {short(name)}; valid: {', '.join(GATE_MODES)}"
        ) from None


def normalized(vectors: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm, the norm clamped to at least 1e-8 (a new tensor).

    Examples
    --------
    >>> normalized(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Set ``tokenizer`` to pad on the left with its BOS token (else its EOS), as mergekit does.

    Returns the tokenizer, changed in place (it is the caller's own copy).

    Raises
    ------
    ConfigError
        The tokenizer has neither a BOS nor an EOS token to pad with.
    """
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ConfigError(
            "base_model: its tokenizer has neither a BOS nor an EOS token, which pad the "
            "prompts; expected a tokenizer that defines one; use gate_mode: random or add a "
            "bos_token to the tokenizer's configuration"
        )
    return tokenizer


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The prompts as one padded batch: BOS text + prompt, no other special tokens.

    Returns ``{"input_ids": (B, S), "attention_mask": (B, S)}``.
    """
    encoded = tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _chunks(lengths: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive ranges of prompts whose padded batch holds at most ``limit`` tokens."""
    ranges: list[tuple[int, int]] = []
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        wider = max(longest, length)
        if i > start and wider * (i + 1 - start) > limit:
            ranges.append((start, i))
            start, wider = i, length
        longest = wider
    ranges.append((start, len(lengths)))
    return ranges


def _layer_inputs(model: Any, batch: dict[str, torch.Tensor], reduce: str) -> torch.Tensor:
    """(layers, batch, hidden): each decoder layer's input, at the last position or averaged."""
    layers = model.model.layers
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if reduce == "last":
            captured.append(hidden[:, -1, :].clone())
        else:
            captured.append(hidden.sum(dim=1) / hidden.shape[1])

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured)


def hidden_state_vector(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    reduce: Literal["last", "mean"] = "last",
    max_tokens: int = MAX_TOKENS_PER_PASS,
    what: str = "prompts",
) -> torch.Tensor:
    """Mean over ``prompts`` of each layer's input hidden state, shape (layers, hidden).

    The hidden state of a prompt at a layer is that of its last token
    (``reduce="last"``) or the mean over the positions of the padded batch
    (``reduce="mean"``), as in ``output_hidden_states[:-1]`` of transformers.
    The prompts run as one left-padded batch when it holds at most
    ``max_tokens`` tokens (exactly mergekit's computation), else in
    consecutive batches of at most that many, summed in float32.

    ``model`` (a transformers causal LM with ``model.model.layers``) runs
    without gradients and in eval mode; its training flag is restored.

    Raises
    ------
    ConfigError
        One prompt alone is longer than ``max_tokens`` tokens, or the hidden
        states hold NaN or inf.
    """
    batches = prompt_batches(tokenizer, prompts, max_tokens=max_tokens, what=what)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(batches) == 1:  # mergekit's computation, in the model's dtype
                states = _layer_inputs(model, batches[0], reduce)
                result = states.sum(dim=1) / states.shape[1]
            else:
                total = sum(
                    _layer_inputs(model, batch, reduce).to(torch.float32).sum(dim=1)
                    for batch in batches
                )
                result = (torch.as_tensor(total) / len(prompts)).to(_states_dtype(model))
    finally:
        model.train(training)
    if not bool(torch.isfinite(result).all()):
        raise ConfigError(
            f"{what}: the base model's hidden states hold NaN or inf; expected finite values; "
            "check the base model's weights or use gate_mode: cheap_embed"
        )
    return result


def _states_dtype(model: Any) -> torch.dtype:
    """The dtype of ``model``'s parameters."""
    return next(model.parameters()).dtype


def prompt_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_tokens: int = MAX_TOKENS_PER_PASS,
    what: str = "prompts",
) -> list[dict[str, torch.Tensor]]:
    """The prompts as left-padded batches of at most ``max_tokens`` tokens (one when they fit).

    Raises
    ------
    ConfigError
        One prompt alone is longer than ``max_tokens`` tokens.
    """
    lengths = [
        len(tokenizer((tokenizer.bos_token or "") + p, add_special_tokens=False)["input_ids"])
        for p in prompts
    ]
    longest = max(lengths)
    if longest > max_tokens:
        raise ConfigError(
            f"{what}: a prompt of {longest} tokens is longer than the {max_tokens} tokens run "
            "at once; shorten it"
        )
    return [
        tokenize_prompts(tokenizer, prompts[start:stop])
        for start, stop in _chunks(lengths, max_tokens)
    ]


def cheap_embedding_vector(
    rows: Callable[[torch.Tensor], torch.Tensor],
    batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    num_layers: int,
) -> torch.Tensor:
    """The unit-length sum of the prompts' token embeddings, repeated per layer: (layers, hidden).

    Parameters
    ----------
    rows : callable
        ``rows(input_ids)`` -> the embedding rows of those token ids,
        shape ``input_ids.shape + (hidden,)``.
    batch : dict or sequence of dict
        ``input_ids`` and ``attention_mask`` (B, S); masked positions are left
        out. Several batches (of one prompt set) are summed.
    num_layers : int
        Rows of the result.

    Examples
    --------
    >>> table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    >>> ids, mask = torch.tensor([[2, 0, 1]]), torch.tensor([[0, 1, 1]])
    >>> batch = {"input_ids": ids, "attention_mask": mask}
    >>> cheap_embedding_vector(lambda ids: table[ids], batch, 2).tolist()  # (1, 2) / sqrt(5)
    [[0.4472135901451111, 0.8944271802902222], [0.4472135901451111, 0.8944271802902222]]
    """
    parts = []
    for one in [batch] if isinstance(batch, dict) else batch:
        embedded = rows(one["input_ids"]).to(torch.float32)
        mask = one["attention_mask"].unsqueeze(-1).to(embedded.dtype)
        parts.append((embedded * mask).sum(dim=1).sum(dim=0, keepdim=True))
    summed = parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)
    return normalized(summed).repeat(num_layers, 1)


def random_gates(
    num_layers: int,
    count: int,
    hidden_size: int,
    *,
    generator: torch.Generator,
    uniform: bool = False,
) -> torch.Tensor:
    """Random router rows, shape (layers, count, hidden), drawn from ``generator``.

    Normal draws, or with ``uniform`` draws in ``[-s, s)`` with ``s = 1/sqrt(hidden_size)``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> torch.equal(random_gates(2, 3, 4, generator=g),
    ...             torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)))
    True
    """
    shape = (num_layers, count, hidden_size)
    if uniform:
        scale = (1.0 / hidden_size) ** 0.5
        return torch.rand(shape, generator=generator) * 2 * scale - scale
    return torch.randn(shape, generator=generator)


def gate_vectors(
    prompt_sets: Sequence[tuple[str, Sequence[str], Sequence[str] | None]],
    vector: Callable[[Sequence[str], str], torch.Tensor],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Router rows from prompts, shape (layers, experts, hidden).

    Parameters
    ----------
    prompt_sets : sequence of (label, positive, negative)
        Each expert's name in messages (``experts[0]``), positive prompts and
        negative prompts (or None).
    vector : callable
        ``vector(prompts, what)`` -> (layers, hidden), the direction of a set
        of prompts (:func:`hidden_state_vector` or :func:`cheap_embedding_vector`).
    progress : callable, optional
        Called ``progress(1, 0)`` after each expert.

    Returns
    -------
    Tensor
        For expert ``e``: ``normalized(vector(positive) - vector(negative))``.

    Examples
    --------
    >>> table = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0, 1.0]])}
    >>> sets = [("experts[0]", ["a"], None), ("experts[1]", ["b"], ["a"])]
    >>> rows = gate_vectors(sets, lambda prompts, what: table[prompts[0]].clone())
    >>> rows[0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    rows = []
    for label, positive, negative in prompt_sets:
        direction = vector(positive, f"{label}.positive_prompts")
        if negative:
            direction -= vector(negative, f"{label}.negative_prompts")
        rows.append(normalized(direction))
        if progress is not None:
            progress(1, 0)
    return torch.stack(rows, dim=0).permute(1, 0, 2)
