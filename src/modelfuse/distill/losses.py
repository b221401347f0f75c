"""The distillation loss: softened teacher probabilities plus, optionally, hard labels.

Hinton, Vinyals and Dean (2015), *Distilling the Knowledge in a Neural
Network*: the student matches the teacher's probabilities softened by a
temperature ``T``; the Kullback-Leibler term is multiplied by ``T**2`` so that
its gradients keep their size as ``T`` changes. With labels, a mixing weight
``alpha`` balances it against the cross-entropy on the hard labels. MEAL V2
(Shen and Savvides, 2020) drops the hard labels and learns from the teacher's
soft labels only (``soft_only=True``).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from modelfuse.errors import ConfigError, DataError

__all__ = ["agreement", "distillation_loss", "soft_kl"]


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return value


def _check_alpha(alpha: float) -> float:
    value = float(alpha)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"alpha: the weight of the teacher's term must lie in [0, 1], got {alpha!r}"
        )
    return value


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(p_teacher_T || p_student_T)`` averaged over the rows, with ``p_T = softmax(z / T)``.

    Teacher logits may hold ``-inf`` (a class of probability zero, e.g. the
    log of an averaged ensemble probability): ``0 * log 0`` counts as 0.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor of shape (n_samples, n_classes)
    temperature : float, default 1.0

    Returns
    -------
    Tensor
        A scalar, differentiable in ``student_logits``.

    Examples
    --------
    >>> import torch
    >>> z = torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(soft_kl(z, z, temperature=2.0))
    0.0
    """
    t = _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise DataError(
            f"distillation: student logits of shape {tuple(student_logits.shape)} and teacher "
            f"logits of shape {tuple(teacher_logits.shape)}; expected the same "
            "(n_samples, n_classes)"
        )
    teacher = teacher_logits.to(student_logits.dtype)
    log_teacher = torch.log_softmax(teacher / t, dim=1)
    p_teacher = log_teacher.exp()
    log_student = torch.log_softmax(student_logits / t, dim=1)
    terms = torch.where(p_teacher > 0, p_teacher * (log_teacher - log_student), 0.0)
    return terms.sum(dim=1).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    *,
    soft_only: bool = False,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss, averaged over the rows.

    With labels (and ``soft_only=False``)::

        alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

    where ``s`` and ``t`` are the student's and the teacher's logits and the
    cross-entropy is taken at temperature 1. Without labels, or with
    ``soft_only=True`` (MEAL V2: the teacher's soft labels only), the loss is
    ``T**2 * KL(...)`` alone and ``alpha`` plays no part.

    Parameters
    ----------
    student_logits : Tensor of shape (n_samples, n_classes)
    teacher_logits : Tensor of shape (n_samples, n_classes)
        Logits, or log-probabilities (the two give the same softened
        probabilities); ``-inf`` marks a class of probability zero.
    labels : Tensor of shape (n_samples,), optional
        Integer classes in ``[0, n_classes)``.
    temperature : float, default 4.0
        ``T > 0``; larger values soften both distributions.
    alpha : float, default 0.9
        The weight of the teacher's term when labels are used, in ``[0, 1]``.
    soft_only : bool, default False
        Ignore ``labels``.

    Returns
    -------
    Tensor
        A scalar, differentiable in ``student_logits``; the teacher's logits
        get no gradient.

    Raises
    ------
    ConfigError
        ``temperature <= 0`` or ``alpha`` outside ``[0, 1]``.
    DataError
        The shapes do not match, or a label is outside the class range.

    Examples
    --------
    >>> import math, torch
    >>> s = torch.tensor([[0.0, 0.0]])
    >>> t = torch.tensor([[0.0, 2.0 * math.log(9.0)]])  # p = (0.1, 0.9) at T=2
    >>> round(float(distillation_loss(s, t, temperature=2.0)), 4)  # 4 * KL((.1, .9) || (.5, .5))
    1.4723
    >>> y = torch.tensor([1])
    >>> round(float(distillation_loss(s, t, y, temperature=2.0, alpha=0.0)), 4)  # CE = log 2
    0.6931
    """
    t = _check_temperature(temperature)
    a = _check_alpha(alpha)
    kl = soft_kl(student_logits, teacher_logits.detach(), temperature=t) * (t * t)
    if labels is None or soft_only:
        return kl
    n, k = student_logits.shape
    if labels.shape != (n,):
        raise DataError(
            f"distillation: {tuple(labels.shape)} labels for {n} rows of logits; "
            "expected one label per row"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise DataError(
            f"distillation: labels must lie in [0, {k}) for {k} classes, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    ce = F.cross_entropy(student_logits, labels.long())
    return a * kl + (1.0 - a) * ce


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """The fraction of rows where the student's top class is the teacher's.

    Examples
    --------
    >>> import torch
    >>> agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [3.0, 0.0]]))
    0.5
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise DataError(
            f"agreement: student logits of shape {tuple(student_logits.shape)} and teacher "
            f"logits of shape {tuple(teacher_logits.shape)}; expected the same "
            "(n_samples, n_classes)"
        )
    same = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
    return float(same.double().mean())
