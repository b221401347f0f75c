"""What a merge method is: its per-tensor function, its parameters and how the engine runs it.

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

Registering a method is one entry in the
:data:`~modelfuse.merge.registry.METHODS` dict.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from modelfuse.merge.parameters import MethodParameters

__all__ = ["MergeMethod", "PrepareInput", "Reduction"]


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
    base_statistics : bool
        Whether the base model may provide statistics of the same kinds
        (``base_statistics`` in a configuration), passed as ``base_KIND``.
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
    base_statistics: bool = False
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
