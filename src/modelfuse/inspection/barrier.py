r"""The loss barrier on the line between two models.

With :math:`\theta(\alpha) = (1 - \alpha)\,\theta_A + \alpha\,\theta_B`, the barrier
is :math:`\max_\alpha \big[L(\theta(\alpha)) - ((1 - \alpha) L(\theta_A) + \alpha L(\theta_B))\big]`
over a grid of :math:`\alpha` in [0, 1]: the bump of the loss above the straight
line between the endpoints' losses. Near zero, averaging the two is safe (they
sit in one basin, linearly mode connected); a large barrier says averaging their
weights loses what each has (Frankle et al. 2020, "Linear mode connectivity and
the lottery ticket hypothesis"; Entezari et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from modelfuse.errors import ConfigError, DataError

__all__ = ["Barrier", "LossFunction", "interpolation_barrier"]

LossFunction = Callable[[Mapping[str, torch.Tensor]], float]
"""``loss(state_dict) -> float``: the loss of a model with these weights on your data."""


@dataclass(frozen=True)
class Barrier:
    """The losses along the line between two models and the barrier they show.

    Attributes
    ----------
    first, second : str
        The two models (alpha 0 and alpha 1).
    alphas, losses : tuple of float
        The grid and the loss at each point.
    barrier : float
        The largest excess of the loss over the straight line between the
        endpoints' losses (0 when the loss never rises above it).
    alpha : float
        Where that excess is largest.
    """

    first: str
    second: str
    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    barrier: float
    alpha: float

    @property
    def relative(self) -> float:
        """The barrier over the mean of the endpoints' losses (NaN when that mean is 0)."""
        scale = (abs(self.losses[0]) + abs(self.losses[-1])) / 2
        return self.barrier / scale if scale > 0 else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "first": self.first,
            "second": self.second,
            "barrier": self.barrier,
            "relative_barrier": None if math.isnan(self.relative) else self.relative,
            "alpha_of_barrier": self.alpha,
            "alphas": list(self.alphas),
            "losses": list(self.losses),
        }


def interpolation_barrier(
    first: Mapping[str, torch.Tensor],
    second: Mapping[str, torch.Tensor],
    loss: LossFunction,
    *,
    alphas: int = 11,
    names: tuple[str, str] = ("A", "B"),
) -> Barrier:
    """The loss barrier on the straight line between two state dicts.

    Parameters
    ----------
    first, second : mapping of str to Tensor
        The two models' weights (same names and shapes). Not modified.
    loss : callable
        ``loss(state_dict) -> float``, e.g. loads the weights into a module
        and returns the mean loss on a held-out batch.
    alphas : int, default 11
        Points on the grid ``linspace(0, 1, alphas)``; at least 3.
    names : (str, str)
        The two models' names, for the result.

    Returns
    -------
    Barrier

    Raises
    ------
    ConfigError
        Fewer than 3 points, or state dicts with different names or shapes.
    DataError
        The loss is not a finite number at some point.

    Examples
    --------
    A concave loss rises above the line; the barrier of :math:`-\\|\\theta\\|^2`
    between 0 and :math:`b` is :math:`\\|b\\|^2 / 4`, at alpha 0.5:

    >>> a, b = {"w": torch.zeros(2)}, {"w": torch.tensor([2.0, 0.0])}
    >>> result = interpolation_barrier(a, b, lambda s: -float((s["w"] ** 2).sum()))
    >>> result.barrier, result.alpha
    (1.0, 0.5)
    """
    if int(alphas) < 3:
        raise ConfigError(f"alphas: expected at least 3 points on the line, got {alphas}")
    if set(first) != set(second):
        missing = sorted(set(first) ^ set(second))[:3]
        raise ConfigError(
            f"{names[0]} and {names[1]} have different tensors (e.g. {', '.join(missing)}); "
            "expected two models of one architecture"
        )
    for key in first:
        if tuple(first[key].shape) != tuple(second[key].shape):
            raise ConfigError(
                f"tensor {key[:80]} has shape {list(first[key].shape)} in {names[0]} but "
                f"{list(second[key].shape)} in {names[1]}; expected the same shape"
            )
    grid = [i / (int(alphas) - 1) for i in range(int(alphas))]
    losses = []
    with torch.no_grad():
        for alpha in grid:
            state = {
                key: torch.lerp(
                    first[key].to(torch.float32), second[key].to(torch.float32), alpha
                ).to(first[key].dtype)
                if first[key].is_floating_point()
                else first[key].clone()
                for key in first
            }
            value = float(loss(state))
            if not math.isfinite(value):
                raise DataError(
                    f"loss: {value} at alpha {alpha:.3g} between {names[0]} and {names[1]}; "
                    "expected a finite number; check the loss function and the data"
                )
            losses.append(value)
    excess = [
        value - ((1 - alpha) * losses[0] + alpha * losses[-1]) for alpha, value in zip(grid, losses)
    ]
    top = max(range(len(grid)), key=lambda i: excess[i])
    return Barrier(names[0], names[1], tuple(grid), tuple(losses), max(0.0, excess[top]), grid[top])
