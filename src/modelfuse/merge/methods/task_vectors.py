r"""Task vectors: the one implementation behind task arithmetic, TIES, DARE and breadcrumbs.

Every method of the family is a setting of :func:`generalized_task_arithmetic`:

1. task vectors :math:`\tau_i = \theta_i - \theta_b`;
2. sparsify each :math:`\tau_i` (``sparsification``): keep the ``density``
   fraction of largest magnitudes (TIES), a Bernoulli sample of entries (DARE),
   or drop the top ``gamma`` and the bottom ``1 - density - gamma`` by magnitude
   (breadcrumbs), or a Bernoulli sample whose keep probabilities rise with each
   entry's magnitude rank in its row (DELLA's ``"della_magprune"``); optionally
   rescale what is kept;
3. weight: :math:`x_i = w_i \hat\tau_i`;
4. combine: the sum :math:`\sum_i x_i`, or with ``consensus_method`` a sign
   election :math:`\gamma = \operatorname{sign}(\sum_i x_i)` (``"sum"``) or
   :math:`\operatorname{sign}(\sum_i \operatorname{sign} x_i)` (``"count"``), ties
   to +, and only the entries agreeing with :math:`\gamma` are summed;
5. ``normalize``: divide by the sum of the weights of the models that
   contributed (all of them without election; a zero sum counts as one);
6. :math:`\theta = \theta_b + \lambda \tau_m`.

Each tensor is processed in chunks of 2**18 entries: for every chunk the models
are visited one at a time and only running sums are kept (an election visits
them twice, keeping a chunk per model), so the temporaries are a few chunks
per model whatever the tensor's size (the
magnitude thresholds are found first, exactly, by a selection that reads the
task vector chunk by chunk; see :mod:`modelfuse.merge.methods.magnitude_selection`).

The steps live in files of their own: :mod:`~modelfuse.merge.methods.sparsification`
(the masks, chunk by chunk), :mod:`~modelfuse.merge.methods.random_drops` (DARE's
and DELLA's draws), :mod:`~modelfuse.merge.methods.rescaling` (``rescale`` and its
reduction) and :mod:`~modelfuse.merge.methods.sign_consensus` (the election).

Every step is elementwise once each tensor's magnitude selections are known,
so the engine merges large tensors in blocks of rows: :func:`tensor_selections`
computes them from the whole tensor first (its reduction) and each block gets
them with its ``offset``. DARE's random drops are elementwise by construction:
the draws of flat entry ``e`` of model ``i`` come from a generator seeded by
``s_i + e // RANDOM_CHUNK`` (``s_i`` drawn from the tensor's generator), so any
block of entries finds its own draws without generating the ones before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.magnitude_threshold import MagnitudeThreshold, TensorSelection
from modelfuse.merge.methods.random_drops import della_groups
from modelfuse.merge.methods.rescaling import RescaledSelections, RescaleFactors, set_norm_factors
from modelfuse.merge.methods.sign_consensus import ConsensusMethod, elect_signs
from modelfuse.merge.methods.sparsification import (
    RescaleMethod,
    Sparsification,
    Sparsifier,
    Workspace,
    chunk_size,
    chunk_slices,
    model_sparsifiers,
)
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = [
    "SparsifyingParameters",
    "TaskVectorParameters",
    "generalized_task_arithmetic",
    "sparsify",
]


class TaskVectorParameters(MethodParameters):
    """Parameters shared by every task-vector method."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0,
        description="weight w_i of the model's task vector; negative removes a skill "
        "(mergekit requires it; modelfuse defaults to 1)",
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="scale of the combined task vector, applied last"
    )
    normalize: bool = Field(
        False, description="divide the combined task vector by the sum of the weights"
    )
    int8_mask: bool = Field(
        False,
        description="accepted for mergekit configurations (a memory option there); "
        "no effect on the result",
    )


class SparsifyingParameters(TaskVectorParameters):
    """Parameters of the task-vector methods that sparsify each task vector."""

    density: Annotated[float, PER_MODEL] = Field(
        1.0, ge=0.0, le=1.0, description="fraction of each task vector's entries kept"
    )
    rescale: bool = Field(False, description="rescale the kept entries (see rescale_method)")
    rescale_method: RescaleMethod = Field(
        "l1",
        description="'l1' (as mergekit): multiply the kept entries so that each tensor's task "
        "vector keeps its L1 norm ('l2', 'linf': those norms); 'exact': divide them by "
        "density (DARE's 1/(1-p))",
    )


def _weights(weight: Sequence[float] | None, n: int, method: str) -> list[float]:
    weights = [1.0] * n if weight is None else [float(w) for w in weight]
    if len(weights) != n:
        raise ConfigError(
            f"{method}: {len(weights)} weights for {n} models; give one weight per model"
        )
    return weights


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    epsilon: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    sparsification: Sparsification | None = None,
    consensus_method: ConsensusMethod | None = None,
    rescale: bool = False,
    rescale_method: RescaleMethod = "exact",
    generator: torch.Generator | None = None,
    magnitude_thresholds: Sequence[MagnitudeThreshold] | None = None,
    selections: Sequence[Sequence[TensorSelection]] | RescaledSelections | None = None,
    rescale_factors: RescaleFactors | Sequence[float] | None = None,
    offset: int = 0,
    name: str = "",
    method: str = "task-vector merge",
) -> torch.Tensor:
    r"""Merge task vectors: sparsify, weight, elect signs, normalize, scale, add to the base.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density, gamma, epsilon : float or sequence of float, optional
        Per-model sparsification settings (see :func:`sparsify`).
    lambda_ : float, default 1.0
        Scale of the combined task vector, applied after ``normalize``.
    normalize : bool, default False
        Divide by the sum of the weights of the contributing models.
    sparsification : {"magnitude", "random", "magnitude_outliers", "della_magprune"}, optional
        How each task vector is sparsified; None keeps it whole.
    consensus_method : {"sum", "count"}, optional
        Sign election (TIES); None sums every task vector.
    rescale, rescale_method
        See :func:`sparsify`.
    generator : torch.Generator, optional
        Random numbers for ``sparsification="random"``: one seed :math:`s_i`
        per model is drawn from it (``torch.randint(0, 2**62, (N,))``) and
        model i's draws are :func:`uniform_draws` of :math:`s_i` (one per flat
        entry of the whole tensor).
    magnitude_thresholds : sequence of MagnitudeThreshold, optional
        Whole-model selections, one per model, for ``"magnitude"``.
    selections : sequence of sequence of TensorSelection, optional
        :func:`tensor_selections` of the whole tensor, when the inputs are a
        block of it (the engine's row blocks); found from the inputs when not
        given. A :class:`~modelfuse.merge.methods.rescaling.RescaledSelections`
        (:func:`~modelfuse.merge.methods.rescaling.trim_reduction`) gives the
        norm-rescale factors too.
    rescale_factors : RescaleFactors or sequence of float, optional
        :func:`rescale_factors` of the whole tensor (a norm rescale), when the
        inputs are a block of it; found from the inputs when not given. Their
        drop masks, when present, are applied instead of drawing them again.
    offset : int, default 0
        The flat index of the inputs' first entry in the whole tensor (for
        ``selections`` and the random draws).
    name : str
        The tensor's name (used with ``magnitude_thresholds``).
    method : str
        The method's name for error messages.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
    Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023.
    Yu et al., "Language models are Super Mario: absorbing abilities from homologous
    models as a free lunch", ICML 2024.
    Davari and Belilovsky, "Model breadcrumbs: scaling multi-task model merging with
    sparse masks", ECCV 2024.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, -1.0, 1.0])
    >>> generalized_task_arithmetic([a, b], base, consensus_method="sum", normalize=True)
    tensor([ 1.0000, -1.5000,  2.0000])
    """
    if base is None:
        raise ConfigError(f"{method} needs a base model; set base_model")
    n = len(tensors)
    if n == 0:
        raise ConfigError(f"{method}: no models besides the base; give at least one")
    weights = _weights(weight, n, method)
    if isinstance(selections, RescaledSelections):
        if rescale_factors is None:
            rescale_factors = selections.factors
        selections = selections.selections
    if magnitude_thresholds is not None and len(magnitude_thresholds) != n:
        raise ConfigError(
            f"{method}: {len(magnitude_thresholds)} magnitude thresholds for {n} models"
        )
    if selections is not None and len(selections) != n:
        raise ConfigError(f"{method}: {len(selections)} tensor selections for {n} models")
    if rescale_factors is not None and len(rescale_factors) != n:
        raise ConfigError(f"{method}: {len(rescale_factors)} rescale factors for {n} models")
    if consensus_method is not None and consensus_method not in ("sum", "count"):
        raise ConfigError(
            f"consensus_method: unknown value {consensus_method!r}; valid: sum, count"
        )
    # Inputs stay in their dtype (a bfloat16 tensor is never copied whole); each chunk
    # of the base is converted to float32, so every difference is computed in float32.
    base_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    size = base_flat.numel()
    groups = della_groups(base.shape)
    chunk = chunk_size(sparsification, groups, size)
    workspace = Workspace(chunk)
    sparsifiers, deltas = model_sparsifiers(
        flats,
        base_flat,
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        groups=groups,
        sparsification=sparsification,
        rescale=rescale,
        rescale_method=rescale_method,
        generator=generator,
        magnitude_thresholds=magnitude_thresholds,
        selections=selections,
        offset=offset,
        name=name,
        chunk=chunk,
        workspace=workspace,
        method=method,
    )
    if any(s is not None and s.norm is not None for s in sparsifiers):
        if rescale_factors is None:
            set_norm_factors(sparsifiers, deltas, size, chunk, workspace)
        else:
            given = (
                rescale_factors
                if isinstance(rescale_factors, RescaleFactors)
                else RescaleFactors(tuple(rescale_factors), (None,) * n)
            )
            for sparsifier, factor, mask in zip(sparsifiers, given.factors, given.masks):
                if sparsifier is not None and sparsifier.norm is not None:
                    sparsifier.factor = float(factor)
                    sparsifier.mask = mask
    scale = float(lambda_)
    if consensus_method is None and normalize:
        divisor = sum(weights)
        scale /= divisor if abs(divisor) >= 1e-8 else 1.0
    out = torch.empty(size, dtype=torch.float32)
    for index in chunk_slices(size, chunk, offset):
        base_part = base_flat[index]
        if base_part.dtype != torch.float32:  # converted into a reused buffer
            base_part = workspace.get("base", base_part.numel()).copy_(base_part)
        length = base_part.numel()
        start = offset + index.start
        divisor = None
        if consensus_method is None:
            merged = workspace.get("merged", length)
            for i in range(n):
                sparsifier = sparsifiers[i]
                kept = None if sparsifier is None else sparsifier.take(index.start, length)
                if kept is not None and sparsifier is not None:
                    delta, alpha = kept, weights[i] * sparsifier.factor
                else:
                    delta = torch.sub(flats[i][index], base_part, out=workspace.get("delta", length))
                    alpha = weights[i]
                    if sparsifier is not None:
                        delta = sparsifier(delta, start)
                        alpha *= sparsifier.factor
                if i == 0:  # the first model's values start the sum (0 + x is x)
                    torch.mul(delta, alpha, out=merged)
                else:
                    merged.add_(delta, alpha=alpha)
        else:
            merged, divisor = elect_signs(
                flats,
                base_part,
                index,
                start,
                sparsifiers,
                weights,
                consensus_method,
                normalize,
                workspace,
            )
        if divisor is not None and scale == 1.0:
            # base + merged / divisor in one pass, rounded as the division, then the sum
            torch.addcdiv(base_part, merged, divisor, out=out[index])
            continue
        if divisor is not None:
            merged.div_(divisor)
        torch.add(base_part, merged, alpha=scale, out=out[index])
    return out.reshape(base.shape)


def sparsify(
    delta: torch.Tensor,
    *,
    method: Sparsification,
    density: float,
    gamma: float = 0.0,
    rescale: bool = False,
    rescale_method: RescaleMethod = "exact",
    generator: torch.Generator | None = None,
    threshold: MagnitudeThreshold | None = None,
    name: str = "",
    epsilon: float = 0.0,
) -> torch.Tensor:
    r"""Sparsify one task vector; returns a new tensor.

    The whole-tensor form of the sparsification step of
    :func:`generalized_task_arithmetic` (which applies it chunk by chunk).

    Parameters
    ----------
    delta : Tensor
        The task vector. Not modified.
    method : {"magnitude", "random", "magnitude_outliers", "della_magprune"}
        ``"magnitude"`` keeps the ``k = max(1, int(density * n))`` entries of
        largest magnitude (none when ``density`` is 0; ties go to the lower
        index; see :func:`~modelfuse.merge.methods.magnitude_threshold.kept_count`); ``"random"`` keeps each entry with probability
        ``density`` (DARE); ``"magnitude_outliers"`` drops the ``int(gamma * n)``
        largest and keeps the next ``int(density * n)`` (breadcrumbs; fewer large
        ones are dropped if both do not fit). These are mergekit 0.1.5's counts.
        ``"della_magprune"`` keeps each entry with its own probability, from
        ``density - epsilon`` to ``density + epsilon`` by magnitude rank in its
        row (:func:`della_probabilities`), with ``"exact"`` dividing each kept
        entry by its probability.
    density : float
        Fraction kept, in [0, 1]. ``density >= 1`` keeps everything, unscaled.
    gamma : float, default 0
        Fraction of largest magnitudes dropped (``"magnitude_outliers"``).
    rescale : bool, default False
        Rescale what is kept (only when ``density < 1``).
    rescale_method : {"exact", "l1", "l2", "linf"}, default "exact"
        ``"exact"`` divides by ``density`` (for DARE, exactly :math:`1/(1-p)`);
        ``"l1"`` (mergekit's ``rescale``), ``"l2"`` and ``"linf"`` multiply what
        is kept by :math:`\|\tau\| / \|\hat\tau\|`, the norm before the drop over
        the norm after it, unless either is below 1e-7.
    generator : torch.Generator, optional
        Random numbers for ``"random"``: a seed ``s`` is drawn from it
        (``torch.randint(0, 2**62, (1,))``) and the draws are
        :func:`uniform_draws` of ``s``.
    threshold : MagnitudeThreshold, optional
        A whole-model selection (TIES ``scope="global"``) used instead of the
        per-tensor one for ``"magnitude"``.
    name : str
        The tensor's name, for ``threshold``.
    epsilon : float, default 0
        Half the spread of DELLA's keep probabilities (``"della_magprune"``).

    Examples
    --------
    >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), method="magnitude", density=0.5)
    tensor([ 0., -3.,  2.,  0.])
    >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), method="magnitude", density=0.5,
    ...          rescale=True, rescale_method="l1")  # L1 norm 5.6 kept: times 5.6 / 5
    tensor([ 0.0000, -3.3600,  2.2400,  0.0000])
    """
    flat = delta.to(torch.float32).reshape(-1)
    n = flat.numel()
    random = method in ("random", "della_magprune")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if random else 0
    sparsifier = Sparsifier(
        lambda index, out: flat[index].clone() if out is None else out.copy_(flat[index]),
        n,
        method=method,
        density=density,
        gamma=gamma,
        rescale=rescale,
        rescale_method=rescale_method,
        seed=seed,
        threshold=threshold,
        name=name,
        chunk=max(n, 1),
        workspace=Workspace(n),
        epsilon=epsilon,
        groups=della_groups(delta.shape),
    )
    if sparsifier.norm is not None:
        set_norm_factors(
            [sparsifier],
            [lambda index, out: out.copy_(flat[index])],
            n,
            max(n, 1),
            sparsifier.workspace,
            hold=False,
        )
    kept = sparsifier(flat.clone())
    if sparsifier.factor != 1.0:
        kept.mul_(sparsifier.factor)
    return kept.reshape(delta.shape)
