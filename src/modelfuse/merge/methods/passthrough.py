"""Passthrough: copy one model's tensor, optionally scaled (layer stacking with ``slices:``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = ["PassthroughParameters", "passthrough"]


class PassthroughParameters(MethodParameters):
    """Parameters of :func:`passthrough`."""

    scale: Annotated[float, PER_MODEL] = Field(
        1.0, description="factor the tensor is multiplied by (mergekit's scale)"
    )


def passthrough(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """Return the one input tensor, times ``scale``.

    Used with mergekit's ``slices:`` syntax to stack layers of one or more
    models into a deeper model ("frankenmerges"): every output slice has a
    single source.

    Parameters
    ----------
    tensors : sequence of one Tensor
    base : Tensor, optional
        Unused.
    scale : sequence of one float, optional
        Multiplies the tensor (default 1).

    Raises
    ------
    ConfigError
        More than one input tensor.

    References
    ----------
    Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language
    Models", 2024 (passthrough merges).

    Examples
    --------
    >>> passthrough([torch.tensor([1.0, -2.0])], scale=[0.5])
    tensor([ 0.5000, -1.0000])
    """
    if len(tensors) != 1:
        raise ConfigError(
            f"passthrough takes exactly one model per tensor, got {len(tensors)}; give each "
            "slice a single source"
        )
    factor = 1.0 if scale is None else float(scale[0])
    tensor = tensors[0].to(torch.float32)
    return tensor * factor if factor != 1.0 else tensor.clone()
