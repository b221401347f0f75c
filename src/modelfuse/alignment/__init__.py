"""Aligning models before they are merged: permutations of hidden units (weight matching).

Models trained from different initialisations compute similar features in
different orders; :func:`weight_matching` finds the permutations that align
one to the other and :func:`apply_permutation` applies them, after which the
merge methods of :mod:`modelfuse.merge` apply.
"""

from modelfuse.alignment.weight_matching import (
    PermutationSpec,
    apply_permutation,
    matching_objective,
    sequential_permutation_spec,
    weight_matching,
)

__all__ = [
    "PermutationSpec",
    "apply_permutation",
    "matching_objective",
    "sequential_permutation_spec",
    "weight_matching",
]
