"""Distillation: one student network trained to match a teacher (an ensemble, a merge, ...).

The third road from K networks back to one: merging averages weights (cheap,
often weaker), ensembling averages predictions (stronger, K times the cost),
distillation trains one network on the ensemble's softened predictions and
keeps much of its gain at one network's cost.

- :func:`distillation_loss`: Hinton et al.'s loss, the functional core;
- :func:`teacher_logits` / :func:`teacher_function`: any teacher (module,
  fitted ensemble, callable, list of members) as a logits function, run once
  without gradients;
- :class:`Distiller`: the scikit-learn-style estimator (``fit``,
  ``student_``, ``history_``, ``best_epoch_``).
"""

from modelfuse.distill.distiller import OPTIMIZERS, Distiller
from modelfuse.distill.losses import agreement, distillation_loss, soft_kl
from modelfuse.distill.teacher import evaluation_mode, teacher_function, teacher_logits

__all__ = [
    "OPTIMIZERS",
    "Distiller",
    "agreement",
    "distillation_loss",
    "evaluation_mode",
    "soft_kl",
    "teacher_function",
    "teacher_logits",
]
