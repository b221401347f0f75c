"""``Distiller``: a scikit-learn-style estimator distilling a teacher into a student network."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.utils.data import DataLoader

from modelfuse.distill.data import (
    as_inputs,
    as_labels,
    read_loader,
    shuffled_batches,
    split_batch,
    split_validation,
)
from modelfuse.distill.losses import _check_alpha, _check_temperature, agreement, distillation_loss
from modelfuse.distill.running import (
    given_logits,
    guarded,
    student_logits,
    student_output,
    torch_threads,
    training_mode,
)
from modelfuse.distill.teacher import (
    check_logits,
    forward_in_batches,
    teacher_function,
)
from modelfuse.errors import CheckpointError, ConfigError, DataError
from modelfuse.progress import progress_bar

__all__ = ["OPTIMIZERS", "Distiller"]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, weight_decay: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay
    ),
    "adamw": lambda params, lr, weight_decay: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay
    ),
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=0.9, weight_decay=weight_decay
    ),
}
"""The optimizers ``Distiller(optimizer=...)`` knows (SGD with momentum 0.9)."""


class Distiller(BaseEstimator):
    """Distil a teacher (an ensemble, a merge, any logits function) into one student network.

    The student learns the teacher's temperature-softened probabilities
    (:func:`~modelfuse.distill.distillation_loss`), plus the hard labels when
    they are given and ``soft_only`` is False. ``fit`` trains a **copy** of
    ``student`` (``student_``); the ``student`` passed in, the teacher and the
    data are never modified.

    Parameters
    ----------
    student : nn.Module
        The network to train, mapping a batch of inputs to logits. Copied.
    teacher : nn.Module, fitted model, callable or list of those, optional
        See :func:`~modelfuse.distill.teacher_function`; a list is an
        ensemble averaged in probability space (``average``). May be omitted
        when ``fit`` receives ``teacher_logits``.
    temperature : float, default 4.0
        ``T > 0`` softening both distributions; the KL term is scaled by ``T**2``.
    alpha : float, default 0.9
        The teacher's weight against the hard-label cross-entropy, in [0, 1];
        unused without labels or with ``soft_only``.
    soft_only : bool, default False
        Learn from the teacher's soft labels only (MEAL V2), ignoring labels.
    max_epochs : int, default 20
    batch_size : int, default 64
    lr : float, default 1e-3
    weight_decay : float, default 0.0
    optimizer : {"adam", "adamw", "sgd"}, default "adam"
        See :data:`OPTIMIZERS`.
    validation_fraction : float, optional
        Hold out this seeded random fraction of ``X`` for early stopping
        (alternative to ``fit(..., X_val=...)``).
    patience : int or None, default 5
        Stop after this many epochs without a lower validation loss; None
        trains ``max_epochs``. With validation data the weights of the best
        epoch (lowest validation loss) are restored at the end.
    init_state_dict : mapping of str to Tensor, optional
        Weights the student starts from (e.g. a merge of the teacher's
        members); loaded strictly into the copy.
    average : {"probabilities", "logits"}, default "probabilities"
        How a list of teachers is combined.
    teacher_weights : array of shape (n_members,), optional
        Weights of a list of teachers (uniform when omitted).
    cache_teacher : bool or "auto", default "auto"
        Compute the teacher's outputs once and reuse them every epoch. "auto"
        caches for tensors and arrays (fixed data) and runs the teacher on each
        batch of a ``DataLoader`` (which may augment); True with a DataLoader
        reads it once and shuffles its rows with ``random_state``.
    eval_batch_size : int, default 256
        Rows per forward pass of the teacher and of evaluation.
    random_state : int, default 0
        Seeds the validation split, the shuffling (a ``torch.Generator``) and
        the student's own randomness (dropout), inside
        :func:`torch.random.fork_rng`: torch's global generator is left as it was.
    n_threads : int, optional
        torch's intra-op threads during ``fit`` (restored after); None keeps
        torch's setting. Small networks train many times faster on one thread
        than on several busy ones, and one thread gives the same bytes on any
        machine.
    progress : bool, default False
        Show a progress bar over the epochs on standard error.

    Attributes
    ----------
    student_ : nn.Module
        The trained copy of ``student`` (the best epoch's weights when there
        is validation data), with ``student``'s ``training`` flags.
    history_ : dict of str to list of float
        ``"train_loss"`` per epoch and, with validation data, ``"val_loss"``
        and ``"val_agreement"``.
    best_epoch_ : int
        The epoch (1-based) whose weights ``student_`` holds.
    n_epochs_ : int
        Epochs run (fewer than ``max_epochs`` when stopped early).
    n_classes_ : int
    n_train_ : int
        Training rows per epoch (after the validation split).
    n_val_ : int
        Validation rows (0 without validation data).
    train_agreement_ : float or None
        Fraction of training rows where the student's top class is the
        teacher's (None when the teacher ran batch by batch).
    val_agreement_ : float or None
        The same on the validation data, when given.

    References
    ----------
    Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
    Shen, Savvides. MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy
    on ImageNet without Tricks. 2020.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(200, 4, generator=g)
    >>> _ = torch.manual_seed(0)  # the example's networks start the same every time
    >>> teachers = [nn.Linear(4, 3), nn.Linear(4, 3)]  # an ensemble of two
    >>> d = Distiller(nn.Linear(4, 3), teachers, max_epochs=30, lr=0.05,
    ...               validation_fraction=0.25, n_threads=1).fit(X)
    >>> d.val_agreement_ > 0.9, len(d.history_["val_loss"]) == d.n_epochs_
    (True, True)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Any = None,
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        soft_only: bool = False,
        max_epochs: int = 20,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        validation_fraction: float | None = None,
        patience: int | None = 5,
        init_state_dict: Mapping[str, torch.Tensor] | None = None,
        average: Literal["probabilities", "logits"] = "probabilities",
        teacher_weights: Sequence[float] | np.ndarray | None = None,
        cache_teacher: bool | Literal["auto"] = "auto",
        eval_batch_size: int = 256,
        random_state: int = 0,
        n_threads: int | None = None,
        progress: bool = False,
    ) -> None:
        self.student = student
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.soft_only = soft_only
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.init_state_dict = init_state_dict
        self.average = average
        self.teacher_weights = teacher_weights
        self.cache_teacher = cache_teacher
        self.eval_batch_size = eval_batch_size
        self.random_state = random_state
        self.n_threads = n_threads
        self.progress = progress

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if not isinstance(self.student, nn.Module):
            raise ConfigError(
                f"student: expected a torch.nn.Module, got {type(self.student).__name__}"
            )
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)
        for name in ("max_epochs", "batch_size", "eval_batch_size", "n_threads"):
            value = getattr(self, name)
            if name == "n_threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.patience is not None and (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, (int, np.integer))
            or self.patience < 1
        ):
            raise ConfigError(f"patience: expected an integer >= 1 or None, got {self.patience!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (name == "lr" and value == 0)
            ):
                low = "> 0" if name == "lr" else ">= 0"
                raise ConfigError(f"{name}: expected a finite number {low}, got {value!r}")
        fraction = self.validation_fraction
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0.0 < fraction < 1.0
        ):
            raise ConfigError(
                f"validation_fraction: expected a number in (0, 1) or None, got {fraction!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer: unknown optimizer {str(self.optimizer)[:40]!r}; valid: "
                + ", ".join(OPTIMIZERS)
            )
        if self.cache_teacher not in (True, False, "auto"):
            raise ConfigError(
                f"cache_teacher: expected True, False or 'auto', got {self.cache_teacher!r}"
            )
        if isinstance(self.random_state, bool) or not isinstance(
            self.random_state, (int, np.integer)
        ):
            raise ConfigError(f"random_state: expected an integer, got {self.random_state!r}")

    def _new_student(self) -> nn.Module:
        student = copy.deepcopy(self.student)
        if self.init_state_dict is not None:
            try:
                student.load_state_dict(dict(self.init_state_dict))
            except (RuntimeError, KeyError, TypeError) as exc:
                first = str(exc).strip().splitlines() or [type(exc).__name__]
                raise CheckpointError(
                    f"init_state_dict: does not fit the student ({' '.join(first)[:200]}); "
                    "give the state dict of the student's architecture"
                ) from None
        return student

    # --------------------------------------------------------------------- fit
    def fit(
        self,
        X: torch.Tensor | np.ndarray | DataLoader,
        y: torch.Tensor | np.ndarray | None = None,
        *,
        X_val: torch.Tensor | np.ndarray | DataLoader | None = None,
        y_val: torch.Tensor | np.ndarray | None = None,
        teacher_logits: torch.Tensor | np.ndarray | None = None,
        val_teacher_logits: torch.Tensor | np.ndarray | None = None,
    ) -> Distiller:
        """Train ``student_`` on ``X`` (and ``y`` when given) to match the teacher.

        Parameters
        ----------
        X : Tensor or array of shape (n_samples, ...), or a DataLoader
            Training inputs; a DataLoader yields ``(inputs, labels)`` or inputs.
        y : Tensor or array of shape (n_samples,), optional
            Integer labels (not with a DataLoader, whose batches carry them).
        X_val, y_val : optional
            Validation data for early stopping (instead of ``validation_fraction``).
        teacher_logits, val_teacher_logits : Tensor or array of shape (n, n_classes), optional
            The teacher's outputs, precomputed on ``X`` and ``X_val`` row for
            row; the teacher is then not run on them.

        Returns
        -------
        self

        Raises
        ------
        ConfigError
            A parameter is out of range, or no teacher is given for some data.
        DataError
            Inputs, labels or logits are malformed, or their shapes disagree.
        CheckpointError
            ``init_state_dict`` does not fit the student.
        """
        self._check_params()
        with torch_threads(self.n_threads):
            return self._fit_data(X, y, X_val, y_val, teacher_logits, val_teacher_logits)

    def _fit_data(
        self,
        X: Any,
        y: Any,
        X_val: Any,
        y_val: Any,
        teacher_logits: Any,
        val_teacher_logits: Any,
    ) -> Distiller:
        generator = torch.Generator().manual_seed(int(self.random_state))
        teacher = (
            None
            if self.teacher is None
            else teacher_function(self.teacher, average=self.average, weights=self.teacher_weights)
        )
        streaming = isinstance(X, DataLoader) and self.cache_teacher is not True
        if isinstance(X, DataLoader) and y is not None:
            raise ConfigError("y: with a DataLoader the labels come from its batches; omit y")
        if teacher is None and (streaming or teacher_logits is None):
            raise ConfigError(
                "teacher: none given; pass Distiller(student, teacher) or "
                "fit(..., teacher_logits=...) computed on X"
            )
        if X_val is not None and self.validation_fraction is not None:
            raise ConfigError("give either validation_fraction or X_val, not both")
        if streaming and teacher_logits is not None:
            raise ConfigError(
                "teacher_logits: precomputed outputs need fixed data; give X as a tensor or "
                "array, or cache_teacher=True to read the DataLoader once"
            )
        if streaming and self.validation_fraction is not None:
            raise ConfigError(
                "validation_fraction: cannot split a DataLoader read batch by batch; give X_val"
            )
        student = self._new_student()

        train: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        n_classes: int | None = None
        if not streaming:
            if isinstance(X, DataLoader):
                x_all, y_all = read_loader(X, source="X")
            else:
                x_all, y_all = X, y
            x = as_inputs(x_all, source="X")
            t = self._teacher_outputs(teacher, x, teacher_logits, "teacher_logits", "X")
            n_classes = int(t.shape[1])
            labels = (
                None
                if y_all is None
                else as_labels(y_all, n_samples=x.shape[0], n_classes=n_classes, source="y")
            )
            train = (x, t, labels)
        train, validation = self._validation(
            teacher, train, X_val, y_val, val_teacher_logits, n_classes, generator
        )
        if validation is not None and n_classes is None:
            n_classes = int(validation[1].shape[1])
        self._fit(student, X, train, validation, teacher, n_classes, generator)
        return self

    def _teacher_outputs(
        self,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None,
        x: torch.Tensor,
        given: Any,
        name: str,
        data: str,
    ) -> torch.Tensor:
        if given is not None:
            logits = given_logits(given, source=name)
            check_logits(logits, rows=x.shape[0], source=name)
            return logits
        if teacher is None:
            raise ConfigError(
                f"{name}: no teacher to run on {data}; give {name}= or Distiller(..., teacher)"
            )
        return guarded(
            lambda: forward_in_batches(
                teacher, x, batch_size=int(self.eval_batch_size), source="teacher"
            ),
            f"teacher on {data}",
            x,
        )

    def _validation(
        self,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None,
        train: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        X_val: Any,
        y_val: Any,
        val_teacher_logits: Any,
        n_classes: int | None,
        generator: torch.Generator,
    ) -> Any:
        """``(train, validation)``: ``train`` split, or as it is beside the given validation data."""
        if self.validation_fraction is not None and train is not None:
            x, t, labels = train
            rows, held = split_validation(x.shape[0], float(self.validation_fraction), generator)
            y_rows, y_held = (None, None) if labels is None else (labels[rows], labels[held])
            return (x[rows], t[rows], y_rows), (x[held], t[held], y_held)
        if X_val is None:
            if y_val is not None or val_teacher_logits is not None:
                raise ConfigError("y_val and val_teacher_logits need X_val")
            return train, None
        if isinstance(X_val, DataLoader):
            if y_val is not None:
                raise ConfigError("y_val: with a DataLoader the labels come from its batches")
            x_raw, y_raw = read_loader(X_val, source="X_val")
        else:
            x_raw, y_raw = X_val, y_val
        x = as_inputs(x_raw, source="X_val")
        if train is not None and x.shape[1:] != train[0].shape[1:]:
            raise DataError(
                f"X_val: rows of shape {tuple(x.shape[1:])}, X {tuple(train[0].shape[1:])}; "
                "expected the same shape"
            )
        t = self._teacher_outputs(teacher, x, val_teacher_logits, "val_teacher_logits", "X_val")
        if n_classes is not None and t.shape[1] != n_classes:
            raise DataError(
                f"val_teacher_logits: {t.shape[1]} classes, the training data's teacher "
                f"{n_classes}; expected the same classes"
            )
        labels = (
            None
            if y_raw is None
            else as_labels(y_raw, n_samples=x.shape[0], n_classes=int(t.shape[1]), source="y_val")
        )
        return train, (x, t, labels)

    def _batches(
        self,
        X: Any,
        train: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None,
        generator: torch.Generator,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """One epoch's ``(inputs, teacher logits, labels)`` batches."""
        if train is not None:
            x, t, labels = train
            for rows in shuffled_batches(x.shape[0], int(self.batch_size), generator):
                yield x[rows], t[rows], None if labels is None else labels[rows]
            return
        if teacher is None:  # fit refuses it first; kept as a guard for subclasses
            raise ConfigError("teacher: a DataLoader needs a teacher to label its batches")
        for i, batch in enumerate(X):
            xb_raw, yb_raw = split_batch(batch, source="X")
            xb = as_inputs(xb_raw, source=f"X (batch {i})")
            tb = guarded(
                lambda xb=xb: forward_in_batches(
                    teacher, xb, batch_size=int(self.eval_batch_size), source="teacher"
                ),
                "teacher on X",
                xb,
            )
            yb = (
                None
                if yb_raw is None
                else as_labels(
                    yb_raw,
                    n_samples=xb.shape[0],
                    n_classes=int(tb.shape[1]),
                    source=f"y (batch {i})",
                )
            )
            yield xb, tb, yb

    def _fit(
        self,
        student: nn.Module,
        X: Any,
        train: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None,
        n_classes: int | None,
        generator: torch.Generator,
    ) -> None:
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("student: has no trainable parameters; nothing to distil into")
        optimizer = OPTIMIZERS[self.optimizer](
            params, lr=float(self.lr), weight_decay=float(self.weight_decay)
        )
        loss_options = {
            "temperature": float(self.temperature),
            "alpha": float(self.alpha),
            "soft_only": bool(self.soft_only),
        }
        history: dict[str, list[float]] = {"train_loss": []}
        if validation is not None:
            history["val_loss"], history["val_agreement"] = [], []
        best_loss, best_epoch, best_state, waited = math.inf, 0, None, 0
        checked = False
        with (
            torch.random.fork_rng(devices=[]),
            progress_bar(
                "distilling", int(self.max_epochs), enabled=bool(self.progress)
            ) as advance,
        ):
            torch.manual_seed(int(self.random_state))  # dropout; restored by fork_rng
            for epoch in range(1, int(self.max_epochs) + 1):
                total, count = 0.0, 0
                with training_mode(student):
                    for xb, tb, yb in self._batches(X, train, teacher, generator):
                        out = student(xb) if checked else student_output(student, xb, tb)
                        checked = True
                        loss = distillation_loss(out, tb, yb, **loss_options)
                        if not torch.isfinite(loss):
                            raise DataError(
                                f"distillation: the loss became {loss.item()} in epoch {epoch}; "
                                "lower lr (the training diverged)"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += loss.item() * xb.shape[0]
                        count += xb.shape[0]
                if count == 0:
                    raise DataError("X: the DataLoader yields no batches; expected data")
                n_train = count
                history["train_loss"].append(total / count)
                if validation is not None:
                    val_loss, val_agree = self._evaluate(student, validation, loss_options)
                    history["val_loss"].append(val_loss)
                    history["val_agreement"].append(val_agree)
                    if val_loss < best_loss:
                        best_loss, best_epoch, waited = val_loss, epoch, 0
                        best_state = {
                            k: v.detach().clone() for k, v in student.state_dict().items()
                        }
                    else:
                        waited += 1
                else:
                    best_epoch = epoch
                advance(1, 0)
                if self.patience is not None and validation is not None and waited >= self.patience:
                    break
        if best_state is not None:
            student.load_state_dict(best_state)
        self.student_ = student
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.n_epochs_ = len(history["train_loss"])
        self.n_train_ = n_train
        self.n_val_ = 0 if validation is None else int(validation[0].shape[0])
        self.n_classes_ = n_classes if n_classes is not None else int(tb.shape[1])
        self.train_agreement_ = (
            None if train is None else self._evaluate(student, train, loss_options)[1]
        )
        self.val_agreement_ = (
            None if validation is None else self._evaluate(student, validation, loss_options)[1]
        )

    def _evaluate(
        self,
        student: nn.Module,
        data: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        loss_options: dict[str, Any],
    ) -> tuple[float, float]:
        """``(loss, agreement with the teacher)`` of ``student`` on ``data``."""
        x, t, labels = data
        logits = student_logits(student, x, int(self.eval_batch_size))
        loss = float(distillation_loss(logits, t, labels, **loss_options))
        return loss, agreement(logits, t)

    # ----------------------------------------------------------------- predict
    def _check_fitted(self) -> nn.Module:
        if not hasattr(self, "student_"):
            raise NotFittedError("This Distiller is not fitted yet; call fit first")
        return self.student_

    def predict_logits(self, X: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The student's logits on ``X``, shape (n_samples, n_classes), without gradients."""
        student = self._check_fitted()
        return student_logits(student, as_inputs(X, source="X"), int(self.eval_batch_size))

    def predict_proba(self, X: torch.Tensor | np.ndarray) -> np.ndarray:
        """The student's probabilities on ``X`` as a NumPy array (n_samples, n_classes)."""
        return torch.softmax(self.predict_logits(X).double(), dim=1).numpy()

    def predict(self, X: torch.Tensor | np.ndarray) -> np.ndarray:
        """The student's top class for every row of ``X``."""
        return self.predict_logits(X).argmax(dim=1).numpy()
