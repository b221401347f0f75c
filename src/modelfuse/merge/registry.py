"""The one registry of merge methods.

A merge method is a pure function of the tensors of one name::

    function(tensors: list[Tensor], base: Tensor | None, **parameters) -> Tensor

``tensors`` are the input models' tensors (never modified): float32, or in their
stored (compute) dtype for methods declaring ``low_precision_inputs``; ``base``
the base model's tensor or ``None``, and ``parameters`` the method's declared
parameters resolved for this tensor (per-model ones as lists, one value per
model). A function may also accept these keywords, which the engine fills in
when the signature asks for them:

``name``
    the tensor's name;
``generator``
    a ``torch.Generator`` seeded from ``random_seed`` and the tensor's name, so
    that results do not depend on the order or the thread that merges tensors;
``statistics``
    ``{kind: list[Tensor | None]}``, per-model statistics tensors of the same
    name (Fisher diagonals, Gram matrices) for data-aware methods;
``offset``
    the flat index of the first entry of ``tensors`` in the whole tensor (0
    unless the engine merges a block of rows; see :class:`Reduction`);
anything returned by the method's ``prepare`` pass (whole-model scalars), and
the value of the method's per-tensor :class:`Reduction` when the engine ran it.

Registering a method is one entry in the :data:`METHODS` dict at the end of
this file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.breadcrumbs import (
    BreadcrumbsParameters,
    BreadcrumbsTiesParameters,
    breadcrumbs,
    breadcrumbs_selections,
    breadcrumbs_ties,
)
from modelfuse.merge.methods.dare import (
    DareLinearParameters,
    DareTiesParameters,
    dare_linear,
    dare_rescale_factors,
    dare_ties,
    norm_rescale,
)
from modelfuse.merge.methods.della import (
    DellaLinearParameters,
    DellaParameters,
    della,
    della_linear,
    della_rescale_factors,
)
from modelfuse.merge.methods.fisher import (
    FisherParameters,
    fisher,
    fisher_separable,
    prepare_fisher,
)
from modelfuse.merge.methods.gradient_matching import GradientMatchingParameters, gradient_matching
from modelfuse.merge.methods.karcher import KarcherParameters, karcher, karcher_gram
from modelfuse.merge.methods.linear import LinearParameters, linear
from modelfuse.merge.methods.model_stock import ModelStockParameters, model_stock, task_vector_gram
from modelfuse.merge.methods.multislerp import MultiSlerpParameters, multislerp, point_gram
from modelfuse.merge.methods.nearswap import NearSwapParameters, nearswap
from modelfuse.merge.methods.nuslerp import NuSlerpParameters, nuslerp, nuslerp_products
from modelfuse.merge.methods.passthrough import PassthroughParameters, passthrough
from modelfuse.merge.methods.regmean import RegMeanParameters, regmean
from modelfuse.merge.methods.rescaling import elementwise_rescale
from modelfuse.merge.methods.sce import SceParameters, sce
from modelfuse.merge.methods.slerp import SlerpParameters, slerp, slerp_products
from modelfuse.merge.methods.task_arithmetic import TaskArithmeticParameters, task_arithmetic
from modelfuse.merge.methods.ties import (
    TiesParameters,
    per_tensor_trimming,
    prepare_ties,
    ties,
    ties_selections,
)
from modelfuse.merge.parameters import MethodParameters, short

__all__ = [
    "METHODS",
    "MergeMethod",
    "PrepareInput",
    "Reduction",
    "get_method",
    "method_table",
]

PrepareInput = Callable[..., Iterator[tuple[str, list[torch.Tensor], "torch.Tensor | None", Any]]]
"""Calling it streams ``(name, tensors, base, parameters)`` over every merged tensor once;
``stream(select)`` reads only the tensors for which ``select(name, parameters)`` is true."""


@dataclass(frozen=True)
class Reduction:
    """A per-tensor pre-pass after which a method merges any block of rows on its own.

    Methods whose output depends on whole-tensor values (SLERP's angle, Model
    Stock's cosine, TIES' magnitude threshold) declare how to compute those
    values; the engine then splits large tensors into blocks of rows like an
    elementwise method's, runs the reduction first and passes its value to
    every block. A tensor merged whole is not reduced: the method computes the
    value from its inputs itself (with the same function).

    Attributes
    ----------
    function : callable
        ``function(tensors, base, **parameters) -> value`` with the method's
        inputs and parameters (it may also accept ``name`` and ``offset``).
    keyword : str
        The method's keyword that receives the value.
    over : {"rows", "tensor"}
        ``"rows"``: the function runs on each block of rows and returns a
        tensor; the engine adds the blocks' tensors in row order (dot products,
        Gram matrices). ``"tensor"``: it runs once on the whole tensor (exact
        order statistics).
    applies : callable, optional
        ``applies(parameters) -> bool``: whether a tensor with these resolved
        parameters needs the reduction to be merged in blocks (default: always).
        Where it does not, the method must be elementwise for those parameters
        or not be split at all (see :attr:`MergeMethod.separable`).
    """

    function: Callable[..., Any]
    keyword: str
    over: Literal["rows", "tensor"] = "rows"
    applies: Callable[[Mapping[str, Any]], bool] | None = None
    accepts: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        names = frozenset(inspect.signature(self.function).parameters)
        object.__setattr__(self, "accepts", names)

    def needed(self, parameters: Mapping[str, Any]) -> bool:
        """Whether a tensor with these resolved parameters is reduced before being split."""
        return self.applies is None or bool(self.applies(parameters))


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes
    ----------
    name : str
        The name used in configurations (``merge_method``).
    function : callable
        The per-tensor function (see the module docstring).
    parameters : type of MethodParameters
        The declaration of every parameter, with defaults and bounds.
    summary : str
        One line for ``--help`` and error messages.
    requires_base : bool
        Whether a ``base_model`` is required.
    optional_base : bool
        Whether the method uses a base model when one is given (without
        requiring one). The base of a method that uses none is not read.
    min_models, max_models : int, int or None
        How many input models (the base not counted) the method takes.
    points : int or None
        How many models the method takes with the base counted, when that is
        fixed (SLERP interpolates between exactly two).
    statistics : tuple of str
        Statistics each model must provide (``"fisher"``, ``"gram"``).
    separable : bool or callable
        Each output row depends only on the same rows of the inputs (true of
        elementwise methods), so the engine may merge large tensors in blocks
        of rows and bound memory by the block. A callable decides from a
        tensor's resolved parameters.
    low_precision_inputs : bool
        The function accepts inputs in their stored (or compute) dtype and
        converts them to float32 chunk by chunk itself, so the engine does not
        hold float32 copies of whole tensors. Otherwise inputs arrive in float32.
    prepare : callable, optional
        ``prepare(stream: PrepareInput) -> dict`` computes whole-model values in
        an extra pass before merging; the dict is passed to every call.
    reduction : Reduction, optional
        Per-tensor values computed first, so that large tensors can be merged
        in blocks of rows although the method is not elementwise.
    """

    name: str
    function: Callable[..., torch.Tensor]
    parameters: type[MethodParameters]
    summary: str
    requires_base: bool = False
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    points: int | None = None
    statistics: tuple[str, ...] = ()
    separable: bool | Callable[[Mapping[str, Any]], bool] = False
    low_precision_inputs: bool = False
    prepare: Callable[[PrepareInput], dict[str, Any]] | None = None
    reduction: Reduction | None = None
    accepts: frozenset[str] = field(default=frozenset(), compare=False)

    def is_separable(self, parameters: Mapping[str, Any]) -> bool:
        """Whether a tensor with these resolved parameters may be merged in row blocks
        (elementwise, or after its :attr:`reduction`)."""
        if self.needs_reduction(parameters):
            return True
        if callable(self.separable):
            return bool(self.separable(parameters))
        return bool(self.separable)

    def needs_reduction(self, parameters: Mapping[str, Any]) -> bool:
        """Whether a tensor with these parameters, merged in blocks, is reduced first."""
        return self.reduction is not None and self.reduction.needed(parameters)

    @property
    def uses_base(self) -> bool:
        """Whether the base model's tensors are passed to :attr:`function`."""
        return self.requires_base or self.optional_base

    def __post_init__(self) -> None:
        names = frozenset(inspect.signature(self.function).parameters)
        object.__setattr__(self, "accepts", names)


def get_method(name: str, *, where: str = "merge_method") -> MergeMethod:
    """Look a method up by name; an unknown name lists the valid ones.

    Examples
    --------
    >>> import modelfuse.merge
    >>> get_method("linear").name
    'linear'
    """
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(METHODS))
        raise ConfigError(
            f"{where}: unknown merge method {short(name)}; valid methods: {valid}"
        ) from None


def method_table(methods: Mapping[str, MergeMethod] | None = None) -> list[tuple[str, str]]:
    """``(name, summary)`` for every method, sorted by name."""
    methods = METHODS if methods is None else methods
    return [(name, methods[name].summary) for name in sorted(methods)]


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(
        "linear",
        linear,
        LinearParameters,
        "weighted average of the models (model soup)",
        separable=True,
        low_precision_inputs=True,
    ),
    "task_arithmetic": MergeMethod(
        "task_arithmetic",
        task_arithmetic,
        TaskArithmeticParameters,
        "base + lambda * weighted sum of task vectors",
        requires_base=True,
        separable=True,
        low_precision_inputs=True,
    ),
    "passthrough": MergeMethod(
        "passthrough",
        passthrough,
        PassthroughParameters,
        "one model's tensor as it is (layer stacking with slices)",
        max_models=1,
        separable=True,
        low_precision_inputs=True,
    ),
    "fisher": MergeMethod(
        "fisher",
        fisher,
        FisherParameters,
        "Fisher-weighted average (needs each model's Fisher diagonal)",
        statistics=("fisher",),
        separable=fisher_separable,
        prepare=prepare_fisher,
        low_precision_inputs=True,
    ),
    "regmean": MergeMethod(
        "regmean",
        regmean,
        RegMeanParameters,
        "linear layers fitted to every model's outputs (needs Gram matrices)",
        statistics=("gram",),
    ),
    "gradient_matching": MergeMethod(
        "gradient_matching",
        gradient_matching,
        GradientMatchingParameters,
        "base + Fisher-precision-weighted task vectors (needs Fisher diagonals)",
        requires_base=True,
        statistics=("fisher",),
        separable=True,
        low_precision_inputs=True,
    ),
    "ties": MergeMethod(
        "ties",
        ties,
        TiesParameters,
        "TIES: trim task vectors to density, elect signs, disjoint mean",
        requires_base=True,
        prepare=prepare_ties,
        low_precision_inputs=True,
        reduction=Reduction(
            ties_selections, "selections", over="tensor", applies=per_tensor_trimming
        ),
    ),
    "dare_linear": MergeMethod(
        "dare_linear",
        dare_linear,
        DareLinearParameters,
        "DARE: random drop, rescale (L1 norm, as mergekit), then task arithmetic",
        requires_base=True,
        low_precision_inputs=True,
        separable=elementwise_rescale,
        reduction=Reduction(
            dare_rescale_factors, "rescale_factors", over="tensor", applies=norm_rescale
        ),
    ),
    "dare_ties": MergeMethod(
        "dare_ties",
        dare_ties,
        DareTiesParameters,
        "DARE: random drop, rescale (L1 norm, as mergekit), then TIES sign election",
        requires_base=True,
        low_precision_inputs=True,
        separable=elementwise_rescale,
        reduction=Reduction(
            dare_rescale_factors, "rescale_factors", over="tensor", applies=norm_rescale
        ),
    ),
    "della": MergeMethod(
        "della",
        della,
        DellaParameters,
        "DELLA: drop with probabilities ranked by magnitude, rescale, TIES sign election",
        requires_base=True,
        low_precision_inputs=True,
        # rows are ranked whole (a 1-D tensor is one row): merged whole unless the norm
        # rescale's reduction records the drop masks of the whole tensor first
        reduction=Reduction(
            della_rescale_factors, "rescale_factors", over="tensor", applies=norm_rescale
        ),
    ),
    "della_linear": MergeMethod(
        "della_linear",
        della_linear,
        DellaLinearParameters,
        "DELLA: drop with probabilities ranked by magnitude, rescale, task arithmetic",
        requires_base=True,
        low_precision_inputs=True,
        reduction=Reduction(
            della_rescale_factors, "rescale_factors", over="tensor", applies=norm_rescale
        ),
    ),
    "breadcrumbs": MergeMethod(
        "breadcrumbs",
        breadcrumbs,
        BreadcrumbsParameters,
        "breadcrumbs: drop the largest gamma and smallest entries, then task arithmetic",
        requires_base=True,
        low_precision_inputs=True,
        reduction=Reduction(
            breadcrumbs_selections, "selections", over="tensor", applies=elementwise_rescale
        ),
    ),
    "breadcrumbs_ties": MergeMethod(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        BreadcrumbsTiesParameters,
        "breadcrumbs, then TIES sign election",
        requires_base=True,
        low_precision_inputs=True,
        reduction=Reduction(
            breadcrumbs_selections, "selections", over="tensor", applies=elementwise_rescale
        ),
    ),
    "sce": MergeMethod(
        "sce",
        sce,
        SceParameters,
        "SCE: keep the entries varying most, weights from mean squares, erase minority signs",
        requires_base=True,
        low_precision_inputs=True,
    ),
    "slerp": MergeMethod(
        "slerp",
        slerp,
        SlerpParameters,
        "spherical interpolation between two models (t = 0: the base_model)",
        optional_base=True,
        max_models=2,
        points=2,
        low_precision_inputs=True,
        reduction=Reduction(slerp_products, "products"),
    ),
    "multislerp": MergeMethod(
        "multislerp",
        multislerp,
        MultiSlerpParameters,
        "weighted spherical average of N models, of task vectors when a base is given",
        optional_base=True,
        low_precision_inputs=True,
        reduction=Reduction(point_gram, "gram"),
    ),
    "model_stock": MergeMethod(
        "model_stock",
        model_stock,
        ModelStockParameters,
        "Model Stock: average pulled toward the base by the task vectors' angle",
        requires_base=True,
        min_models=2,
        low_precision_inputs=True,
        # filter_wise needs no reduction but on 1-D tensors (one row): always reduced
        reduction=Reduction(task_vector_gram, "gram"),
    ),
    "nearswap": MergeMethod(
        "nearswap",
        nearswap,
        NearSwapParameters,
        "NearSwap: the other model's value where it is within t of the base's",
        requires_base=True,
        max_models=1,
        separable=True,
        low_precision_inputs=True,
    ),
    "karcher": MergeMethod(
        "karcher",
        karcher,
        KarcherParameters,
        "Karcher (Riemannian) mean of the models on the sphere, at their mean norm",
        optional_base=True,
        low_precision_inputs=True,
        reduction=Reduction(karcher_gram, "gram"),
    ),
    "nuslerp": MergeMethod(
        "nuslerp",
        nuslerp,
        NuSlerpParameters,
        "spherical interpolation of two models at t = w_2 / (w_1 + w_2), of task vectors "
        "when a base is given",
        optional_base=True,
        min_models=2,
        max_models=2,
        low_precision_inputs=True,
        # the vectors along the last dimension need no reduction (a block holds them
        # whole); the reduction then returns nothing
        reduction=Reduction(nuslerp_products, "products"),
    ),
}
"""Every merge method, by the name used in configurations."""
