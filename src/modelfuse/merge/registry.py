"""The one registry of merge methods: :data:`METHODS`, by the name used in configurations.

Registering a method is one entry in the :data:`METHODS` dict at the end of
this file; what an entry declares is :class:`~modelfuse.merge.merge_method.MergeMethod`
(the per-tensor function's contract is in :mod:`modelfuse.merge.merge_method`).
"""

from __future__ import annotations

from collections.abc import Mapping

from modelfuse.errors import ConfigError
from modelfuse.merge.merge_method import MergeMethod, Reduction
from modelfuse.merge.methods.arcee_fusion import (
    ArceeFusionParameters,
    arcee_fusion,
    fusion_threshold,
)
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
from modelfuse.merge.methods.ram import (
    RamParameters,
    RamPlusParameters,
    ram,
    ram_counts,
    ramplus_tl,
)
from modelfuse.merge.methods.regmean import RegMeanParameters, regmean
from modelfuse.merge.methods.rescaling import elementwise_rescale
from modelfuse.merge.methods.sce import SceParameters, sce, sce_reduction
from modelfuse.merge.methods.slerp import SlerpParameters, slerp, slerp_products
from modelfuse.merge.methods.task_arithmetic import TaskArithmeticParameters, task_arithmetic
from modelfuse.merge.methods.ties import (
    TiesParameters,
    per_tensor_trimming,
    prepare_ties,
    ties,
    ties_selections,
)
from modelfuse.merge.parameters import short

__all__ = ["METHODS", "get_method", "method_table"]


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
        base_statistics=True,
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
        reduction=Reduction(breadcrumbs_selections, "selections", over="tensor"),
    ),
    "breadcrumbs_ties": MergeMethod(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        BreadcrumbsTiesParameters,
        "breadcrumbs, then TIES sign election",
        requires_base=True,
        low_precision_inputs=True,
        reduction=Reduction(breadcrumbs_selections, "selections", over="tensor"),
    ),
    "sce": MergeMethod(
        "sce",
        sce,
        SceParameters,
        "SCE: keep the entries varying most, weights from mean squares, erase minority signs",
        requires_base=True,
        low_precision_inputs=True,
        reduction=Reduction(sce_reduction, "reduced", over="tensor"),
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
    "arcee_fusion": MergeMethod(
        "arcee_fusion",
        arcee_fusion,
        ArceeFusionParameters,
        "Arcee Fusion: the other model's value where its change's importance is an outlier",
        requires_base=True,
        max_models=1,
        low_precision_inputs=True,
        # the quantiles need every entry: the whole tensor is reduced, then merged in blocks
        reduction=Reduction(fusion_threshold, "threshold", over="tensor"),
    ),
    "ram": MergeMethod(
        "ram",
        ram,
        RamParameters,
        "RAM: entries changed by one model kept whole, by several averaged",
        requires_base=True,
        separable=True,
        low_precision_inputs=True,
    ),
    "ramplus_tl": MergeMethod(
        "ramplus_tl",
        ramplus_tl,
        RamPlusParameters,
        "RAM+ (tensor-local): RAM with unique entries scaled by how much each model shares",
        requires_base=True,
        low_precision_inputs=True,
        reduction=Reduction(ram_counts, "counts"),
    ),
}
"""Every merge method, by the name used in configurations."""
