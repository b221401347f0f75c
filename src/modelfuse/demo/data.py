"""The demo's data: scikit-learn's 1,797 handwritten digits, split by seed, and four tasks.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.
Images are 8x8 with intensities 0..16, scaled to [0, 1] and flattened to 64
features. The multi-task scenario derives three more tasks from the same
images and labels: rotated by 90 degrees, inverted intensities, and Gaussian
noise. The soup scenario's shifted test split (:func:`shifted`) tilts the
test images by 15 to 30 degrees either way: a shift no model saw in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelfuse.errors import ConfigError

__all__ = [
    "SHIFT",
    "TASKS",
    "Splits",
    "apply_task",
    "load_digits_scaled",
    "load_splits",
    "shifted",
    "task_seed",
]


@dataclass(frozen=True)
class Splits:
    """Train, validation and test parts of the digits (float32 features in [0, 1]).

    ``pretrain`` indexes the part of the training split the pre-trained model sees;
    ``x_shift`` is the test split's images tilted by :func:`shifted` (labels ``y_test``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pretrain: np.ndarray
    x_shift: np.ndarray | None = None


def load_digits_scaled() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: float32 features in [0, 1] (intensity / 16) and int64 labels.

    Examples
    --------
    >>> x, y = load_digits_scaled()
    >>> x.shape, y.dtype.name, float(x.max())
    ((1797, 64), 'int64', 1.0)
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def load_splits(
    seed: int,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    pretrain_fraction: float = 0.4,
) -> Splits:
    """Stratified train / validation / test splits of the digits, fixed by ``seed``.

    Parameters
    ----------
    seed : int
    val_fraction, test_fraction : float
        Shares of all 1,797 images.
    pretrain_fraction : float
        Share of the training split used to pre-train (stratified).

    Examples
    --------
    >>> s = load_splits(0)
    >>> len(s.y_train) + len(s.y_val) + len(s.y_test), s.x_train.shape[1]
    (1797, 64)
    """
    from sklearn.model_selection import train_test_split

    x, y = load_digits_scaled()
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest,
        y_rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=y_rest,
        random_state=seed + 1,
    )
    pretrain, _ = train_test_split(
        np.arange(len(y_train)),
        train_size=pretrain_fraction,
        stratify=y_train,
        random_state=seed + 2,
    )
    return Splits(
        x_train, y_train, x_val, y_val, x_test, y_test, np.sort(pretrain), shifted(x_test, seed)
    )


def _original(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x.copy()


def _rotated(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(x.reshape(-1, 8, 8), k=1, axes=(1, 2)).reshape(-1, 64).copy()


def _inverted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (1.0 - x).astype(np.float32)


def _noisy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, 0.3, size=x.shape)
    return np.clip(x + noise, 0.0, 1.0).astype(np.float32)


TASKS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "original": _original,
    "rotated": _rotated,
    "inverted": _inverted,
    "noisy": _noisy,
}
"""The multi-task scenario's tasks: a function of the images (and a generator for noise)."""


def apply_task(task: str, x: np.ndarray, seed: int) -> np.ndarray:
    """The images ``x`` as task ``task`` sees them; noise is drawn from ``seed``.

    Parameters
    ----------
    task : str
        A key of :data:`TASKS`.
    x : array of shape (n, 64)
        Not modified.
    seed : int
        Seeds the noise of the ``noisy`` task (the same seed gives the same noise).

    Examples
    --------
    >>> x = np.arange(64, dtype=np.float32)[None] / 63
    >>> float(apply_task("inverted", x, 0)[0, 0])
    1.0
    """
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task](x, np.random.default_rng(seed))


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def task_seed(seed: int, task_index: int, split: str) -> int:
    """The noise seed of one task on one split (train, val or test), fixed by the run's seed.

    Examples
    --------
    >>> task_seed(0, 3, "test")
    32
    """
    if split not in _SPLIT_CODES:
        raise ConfigError(
            f"split: unknown split {split!r}; expected one of {', '.join(_SPLIT_CODES)}"
        )
    return seed * 1000 + 10 * task_index + _SPLIT_CODES[split]


SHIFT = "tilted by 15 to 30 degrees either way"
"""How :func:`shifted` changes the images, as the report states it."""


def shifted(x: np.ndarray, seed: int, *, low: float = 15.0, high: float = 30.0) -> np.ndarray:
    """The images ``x`` tilted by a random angle between ``low`` and ``high`` degrees either way.

    Each image gets its own angle and direction, drawn from ``seed`` (the same
    seed gives the same images); it is rotated about its centre with bilinear
    interpolation, and pixels rotated in from outside the image are 0. No
    model of the demo is trained on tilted images (the fine-tunes' augmentations
    are one-pixel shifts and weak noise), so this is a distribution shift.

    Parameters
    ----------
    x : array of shape (n, 64)
        Flattened 8x8 images in [0, 1]. Not modified.
    seed : int
    low, high : float
        The range of the angle's size, in degrees.

    Returns
    -------
    array of shape (n, 64), float32 in [0, 1]

    Examples
    --------
    >>> x = np.zeros((1, 64), dtype=np.float32); x[0, 27] = 1.0  # a pixel near the centre
    >>> y = shifted(x, 0)
    >>> y.shape, bool(np.array_equal(y, shifted(x, 0))), bool(np.array_equal(y, x))
    ((1, 64), True, False)
    """
    from scipy import ndimage

    rng = np.random.default_rng([seed, 7])
    angles = rng.uniform(low, high, size=len(x)) * rng.choice([-1.0, 1.0], size=len(x))
    images = np.asarray(x, dtype=np.float32).reshape(-1, 8, 8)
    out = np.empty_like(images)
    for i, (image, angle) in enumerate(zip(images, angles)):
        out[i] = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0.0, 1.0).reshape(-1, 64)
