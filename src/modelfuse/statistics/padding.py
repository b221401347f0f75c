"""Padded batches of sequences: the padding taken out, so that it changes no statistic.

A batch of texts of different lengths is padded to its longest text and comes
with an ``attention_mask`` (1 for a real token, 0 for padding), as Hugging
Face tokenizers return it. Statistics must not depend on that padding:

- Gram matrices drop the rows of padded positions (:func:`padding_mask` gives
  the mask the forward hooks use);
- Fisher diagonals run each example on its real tokens only
  (:func:`unpadded` regroups a padded batch into batches of equal length
  without padding), which is what one example at a time sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from modelfuse.errors import DataError
from modelfuse.statistics.batches import Inputs

__all__ = ["padding_mask", "unpadded"]

MASK_KEY = "attention_mask"


def padding_mask(inputs: Inputs, *, where: str = "batch") -> torch.Tensor | None:
    """The ``(batch, positions)`` boolean mask of real tokens, or None without padding mask.

    Parameters
    ----------
    inputs : Tensor or mapping of Tensors
        A batch's inputs; only a mapping with a 2-D ``attention_mask`` has a
        padding mask.
    where : str
        Names the batch in error messages.

    Raises
    ------
    DataError
        The mask holds values other than 0 and 1, an example has no real
        token, or an example's real tokens are not one contiguous block (left
        or right padding only).

    Examples
    --------
    >>> mask = padding_mask({"input_ids": torch.ones(2, 3), "attention_mask":
    ...                      torch.tensor([[1, 1, 1], [1, 1, 0]])})
    >>> mask.tolist()
    [[True, True, True], [True, True, False]]
    >>> padding_mask(torch.ones(2, 3)) is None
    True
    """
    if not isinstance(inputs, Mapping) or MASK_KEY not in inputs:
        return None
    mask = inputs[MASK_KEY]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if bool(((mask != 0) & (mask != 1)).any()):
        raise DataError(
            f"{where}: attention_mask holds values other than 0 and 1; expected 1 for real "
            "tokens and 0 for padding"
        )
    keep = mask != 0
    lengths = keep.sum(1)
    if bool((lengths == 0).any()):
        row = int(torch.nonzero(lengths == 0)[0, 0])
        raise DataError(
            f"{where}: example {row} has no real token (its attention_mask is all 0); "
            "remove empty texts"
        )
    first = keep.int().argmax(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    block = (positions >= first[:, None]) & (positions < (first + lengths)[:, None])
    if not torch.equal(block, keep):
        raise DataError(
            f"{where}: an example's attention_mask has 0s between its real tokens; expected "
            "padding on the left or on the right only"
        )
    return keep


def unpadded(
    inputs: Inputs, labels: torch.Tensor | None, *, where: str = "batch"
) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
    """A padded batch as batches of equal-length examples with the padding removed.

    Every input whose first two dimensions are the mask's ``(batch,
    positions)`` (``input_ids``, ``token_type_ids``, ``position_ids``, the
    ``attention_mask`` itself, ...) keeps each example's real positions only,
    so the mask that remains is all 1s; other inputs are cut by example. A
    batch without an ``attention_mask``, or whose examples are all unpadded,
    is yielded as it is.

    Yields
    ------
    ``(inputs, labels)`` of examples sharing one length, shortest first
    (``labels`` None when given None).

    Examples
    --------
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0], [4, 0, 0]])
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    >>> for part, y in unpadded({"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 1, 2])):
    ...     print(part["input_ids"].tolist(), y.tolist(), sorted(part))
    [[4]] [2] ['attention_mask', 'input_ids']
    [[8, 9]] [1] ['attention_mask', 'input_ids']
    [[5, 6, 7]] [0] ['attention_mask', 'input_ids']
    """
    keep = padding_mask(inputs, where=where)
    if keep is None or not isinstance(inputs, Mapping):
        yield inputs, labels
        return
    lengths = keep.sum(1)
    first = keep.int().argmax(1)
    if bool(keep.all()):
        yield inputs, labels
        return
    shape = tuple(keep.shape)
    for length in sorted(set(lengths.tolist())):
        rows = torch.nonzero(lengths == length).flatten()
        index = first[rows, None] + torch.arange(length, device=keep.device)
        part: dict[str, torch.Tensor] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == shape:
                part[key] = value[rows[:, None], index]
            else:
                part[key] = value[rows]
        yield part, None if labels is None else labels[rows]
