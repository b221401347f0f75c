"""Permutation alignment by weight matching, so models from different initialisations can merge.

Hidden units of a network can be permuted without changing its function:
permute the rows of one layer's weight (and its bias and normalisation
statistics) and the columns of the next layer's weight the same way. Two
networks trained from different initialisations compute similar features
in different orders; aligning the second to the first before averaging
(weight matching) makes their weights comparable.

A :class:`PermutationSpec` says, for every tensor of a state dict, which
named permutation acts on each of its axes. :func:`sequential_permutation_spec`
derives it for ``nn.Sequential`` stacks of Linear / Conv / BatchNorm layers;
:func:`weight_matching` finds the permutations; :func:`apply_permutation`
applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from modelfuse.errors import CheckpointError, ConfigError

__all__ = [
    "PermutationSpec",
    "apply_permutation",
    "matching_objective",
    "sequential_permutation_spec",
    "weight_matching",
]


@dataclass(frozen=True)
class PermutationSpec:
    """Which permutation acts on each axis of each tensor.

    Attributes
    ----------
    axes : mapping name -> tuple of (str or None)
        For each tensor name, one entry per axis: the name of the permutation
        acting on that axis, or ``None``. Tensors not listed are never
        permuted.
    apply_only : frozenset of str
        Tensors that are permuted but left out of the matching objective
        (BatchNorm running statistics).

    Examples
    --------
    >>> spec = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",),
    ...                         "2.weight": (None, "P"), "2.bias": (None,)})
    >>> spec.perm_to_axes
    {'P': [('0.weight', 0), ('0.bias', 0), ('2.weight', 1)]}
    """

    axes: Mapping[str, tuple[str | None, ...]]
    apply_only: frozenset[str] = field(default_factory=frozenset)

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """For each permutation, the ``(tensor name, axis)`` pairs it acts on."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, per_axis in self.axes.items():
            for axis, perm in enumerate(per_axis):
                if perm is not None:
                    out.setdefault(perm, []).append((name, axis))
        return out

    def sizes(self, params: Mapping[str, torch.Tensor], *, where: str = "params") -> dict[str, int]:
        """The size of every permutation, checked against the tensors of ``params``."""
        problems = []
        sizes: dict[str, int] = {}
        for name, per_axis in self.axes.items():
            if name not in params:
                problems.append(f"tensor {name} of the permutation spec is missing")
                continue
            shape = tuple(params[name].shape)
            if len(shape) != len(per_axis):
                problems.append(
                    f"tensor {name} has {len(shape)} axes but the spec gives {len(per_axis)}"
                )
                continue
            for axis, perm in enumerate(per_axis):
                if perm is None:
                    continue
                if sizes.setdefault(perm, shape[axis]) != shape[axis]:
                    problems.append(
                        f"permutation {perm} has size {sizes[perm]} but acts on axis {axis} "
                        f"of {name}, of size {shape[axis]}"
                    )
        if problems:
            raise CheckpointError(
                f"{where} does not fit the permutation spec: "
                + "; ".join(problems)
                + "; derive the spec from the same architecture as the weights"
            )
        return sizes


_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_THROUGH = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
)


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        key = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out += _leaves(child, key + ".")
        else:
            out.append((key, child))
    return out


def sequential_permutation_spec(model: nn.Sequential, *, prefix: str = "") -> PermutationSpec:
    """The permutation spec of an ``nn.Sequential`` stack (nested Sequentials are walked).

    Every Linear or Conv layer but the last gets a permutation of its outputs,
    named ``P_<layer name>``, acting on its weight's axis 0 and bias, on the
    following BatchNorm's weight, bias and running statistics (or 1-D
    LayerNorm's weight and bias), and on axis 1 of the next Linear or Conv.
    Element-wise activations, dropout and pooling pass it through; ``Flatten``
    does when the spatial size is 1 (after global pooling). The last weight
    layer's outputs are not permuted, so the network's outputs are unchanged.

    Parameters
    ----------
    model : nn.Sequential
        The stack; only its structure is read.
    prefix : str, default ""
        Prepended to every tensor name, for a Sequential inside a larger
        model (e.g. ``"features."``).

    Returns
    -------
    PermutationSpec

    Raises
    ------
    ConfigError
        A module the walk does not know (write the spec by hand), a grouped
        convolution, or a Flatten over more than one spatial position.

    Examples
    --------
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> dict(sequential_permutation_spec(m).axes)  # doctest: +NORMALIZE_WHITESPACE
    {'0.weight': ('P_0', None), '0.bias': ('P_0',),
     '2.weight': (None, 'P_0'), '2.bias': (None,)}
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"model: expected an nn.Sequential, got {type(model).__name__}; "
            "write a PermutationSpec by hand for other architectures"
        )
    leaves = _leaves(model, prefix)
    weight_layers = [key for key, m in leaves if isinstance(m, _WEIGHT_LAYERS)]
    if not weight_layers:
        raise ConfigError("model: no Linear or Conv layer to permute")
    axes: dict[str, tuple[str | None, ...]] = {}
    apply_only: set[str] = set()
    current: str | None = None
    size: int | None = None
    features_last = True
    flattened_from: int | None = None
    for key, module in leaves:
        local = {name: t for name, t in module.state_dict().items()}
        if isinstance(module, _WEIGHT_LAYERS):
            if isinstance(module, nn.Linear):
                n_in, n_out, extra = module.in_features, module.out_features, 0
            else:
                if module.groups != 1:
                    raise ConfigError(
                        f"{key}: grouped convolutions (groups={module.groups}) are not supported "
                        "by the automatic spec; write a PermutationSpec by hand"
                    )
                n_in, n_out = module.in_channels, module.out_channels
                extra = module.weight.ndim - 2
            if current is not None and n_in != size:
                raise ConfigError(
                    f"{key}: takes {n_in} inputs but the permuted axis before it has {size} "
                    f"entries (a Flatten over {flattened_from} channels with a spatial size > 1?); "
                    "pool to size 1 before Flatten or write a PermutationSpec by hand"
                )
            out = None if key == weight_layers[-1] else f"P_{key}"
            axes[f"{key}.weight"] = (out, current) + (None,) * extra
            if "bias" in local:
                axes[f"{key}.bias"] = (out,)
            current, size = out, n_out
            features_last = isinstance(module, nn.Linear)
            flattened_from = None
        elif isinstance(module, _BATCH_NORMS) or (
            isinstance(module, nn.LayerNorm)
            and tuple(module.normalized_shape) == (size,)
            and features_last
        ):
            for name in local:
                full = f"{key}.{name}"
                if name == "num_batches_tracked":
                    continue
                axes[full] = (current,)
                if name in ("running_mean", "running_var"):
                    apply_only.add(full)
        elif isinstance(module, _PASS_THROUGH):
            if isinstance(module, nn.PReLU) and module.num_parameters != 1:
                axes[f"{key}.weight"] = (current,)
            if isinstance(module, nn.Flatten):
                flattened_from = size
                features_last = True
        else:
            raise ConfigError(
                f"{key}: the automatic spec does not know {type(module).__name__} modules; "
                "supported: Linear, Conv1d/2d/3d, BatchNorm, 1-D LayerNorm, activations, "
                "dropout, pooling and Flatten; write a PermutationSpec by hand"
            )
    return PermutationSpec(axes, frozenset(apply_only))


def _check_perms(
    spec: PermutationSpec, perms: Mapping[str, torch.Tensor], sizes: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    missing = sorted(set(sizes) - set(perms))
    if missing:
        raise ConfigError(
            f"perms: no permutation given for {missing}; pass the dict weight_matching returns"
        )
    out = {}
    for name, n in sizes.items():
        p = torch.as_tensor(perms[name]).to(torch.long)
        if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise ConfigError(
                f"perms[{name!r}]: expected a permutation of 0..{n - 1}, got {perms[name]!r}"
            )
        out[name] = p
    return out


def _permuted(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    name: str,
    tensor: torch.Tensor,
    except_axis: int | None = None,
) -> torch.Tensor:
    for axis, perm in enumerate(spec.axes[name]):
        if perm is not None and axis != except_axis:
            tensor = tensor.index_select(axis, perms[perm])
    return tensor


def apply_permutation(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Permute the tensors of a state dict: entry ``i`` of a permuted axis becomes ``perm[i]``.

    Parameters
    ----------
    spec : PermutationSpec
    perms : mapping permutation name -> LongTensor
        One permutation of ``0..n-1`` per permutation of the spec.
    params : mapping name -> Tensor
        A state dict. Not modified.

    Returns
    -------
    dict name -> Tensor
        New tensors: ``index_select`` along every permuted axis; tensors the
        spec does not list are copied unchanged.

    Examples
    --------
    >>> spec = PermutationSpec({"a.weight": ("P", None), "b.weight": (None, "P")})
    >>> params = {"a.weight": torch.tensor([[1.0], [2.0]]), "b.weight": torch.tensor([[3.0, 4.0]])}
    >>> out = apply_permutation(spec, {"P": torch.tensor([1, 0])}, params)
    >>> out["a.weight"].ravel().tolist(), out["b.weight"].ravel().tolist()
    ([2.0, 1.0], [4.0, 3.0])
    """
    sizes = spec.sizes(params)
    checked = _check_perms(spec, perms, sizes)
    out = {}
    for name, tensor in params.items():
        tensor = tensor.detach()
        out[name] = _permuted(spec, checked, name, tensor) if name in spec.axes else tensor.clone()
    return out


def matching_objective(
    spec: PermutationSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
) -> float:
    """:math:`\\sum \\langle W_a, W_b \\rangle` over the tensors weight matching compares.

    After ``apply_permutation(spec, weight_matching(spec, a, b), b)`` this is
    at least its value on the unaligned ``b``. Tensors in ``spec.apply_only``
    are left out.

    Examples
    --------
    >>> spec = PermutationSpec({"w": ("P", None)})
    >>> a, b = {"w": torch.eye(2)}, {"w": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    >>> matching_objective(spec, a, b), matching_objective(spec, a, a)
    (0.0, 2.0)
    """
    total = 0.0
    for name in spec.axes:
        if name in spec.apply_only:
            continue
        a = params_a[name].detach().to(torch.float64)
        b = params_b[name].detach().to(torch.float64)
        total += float((a * b).sum())
    return total


def weight_matching(
    spec: PermutationSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Permutations of ``params_b``'s hidden units that best align it with ``params_a``.

    Coordinate ascent on :math:`\\sum_\\ell \\langle W^a_\\ell, P_\\ell W^b_\\ell
    P_{\\ell-1}^T \\rangle`: for each permutation :math:`P` in a random order,
    with every other permutation held fixed,
    :math:`A = \\sum W_a W̃_b^T` over the tensors it touches (each moved so
    that the permuted axis comes first, flattened, and the other
    permutations applied to :math:`W_b`), and :math:`P` is set to
    ``scipy.optimize.linear_sum_assignment(A, maximize=True)``. Sweeps repeat
    until none improves the objective by more than 1e-12, or ``max_iter``
    sweeps. Computed in float64.

    Parameters
    ----------
    spec : PermutationSpec
        E.g. from :func:`sequential_permutation_spec`.
    params_a : mapping name -> Tensor
        The reference model's state dict. Not modified.
    params_b : mapping name -> Tensor
        The model to align. Not modified.
    max_iter : int, default 100
        Maximum sweeps over all permutations.
    seed : int, default 0
        Seed of the order in which permutations are visited.

    Returns
    -------
    dict permutation name -> LongTensor
        ``apply_permutation(spec, perms, params_b)`` is ``params_b`` aligned
        to ``params_a``; it computes the same function as ``params_b``.

    References
    ----------
    Ainsworth, Hayase and Srinivasa, "Git Re-Basin: merging models modulo
    permutation symmetries", ICLR 2023, Algorithm 1.

    Examples
    --------
    >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> spec = sequential_permutation_spec(m)
    >>> a = m.state_dict()
    >>> b = apply_permutation(spec, {"P_0": torch.tensor([2, 0, 3, 1])}, a)
    >>> weight_matching(spec, a, b)["P_0"]       # the inverse permutation
    tensor([1, 3, 0, 2])
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter: expected a positive integer, got {max_iter!r}")
    sizes = spec.sizes(params_a, where="params_a")
    sizes_b = spec.sizes(params_b, where="params_b")
    if sizes != sizes_b:
        raise CheckpointError(
            f"params_a and params_b differ in the sizes of their permutations: {sizes} vs "
            f"{sizes_b}; give two models of one architecture"
        )
    a64 = {n: params_a[n].detach().to(torch.float64) for n in spec.axes}
    b64 = {n: params_b[n].detach().to(torch.float64) for n in spec.axes}
    perm_to_axes = spec.perm_to_axes
    names = sorted(perm_to_axes)
    perms = {p: torch.arange(sizes[p]) for p in names}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for index in rng.permutation(len(names)):
            p = names[index]
            n = sizes[p]
            cost = torch.zeros((n, n), dtype=torch.float64)
            for name, axis in perm_to_axes[p]:
                if name in spec.apply_only:
                    continue
                w_a = torch.movedim(a64[name], axis, 0).reshape(n, -1)
                w_b = _permuted(spec, perms, name, b64[name], except_axis=axis)
                w_b = torch.movedim(w_b, axis, 0).reshape(n, -1)
                cost += w_a @ w_b.T
            _, columns = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.from_numpy(columns).to(torch.long)
            rows = torch.arange(n)
            old_value = float(cost[rows, perms[p]].sum())
            new_value = float(cost[rows, new].sum())
            if new_value > old_value + 1e-12:
                progress = True
                perms[p] = new
        if not progress:
            break
    return perms
