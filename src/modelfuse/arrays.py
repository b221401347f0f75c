"""Reading and checking arrays of predictions, scores and labels.

Shared by the ensemble, calibration and comparison commands so that every one
of them accepts the same files (``.npy``, ``.npz``, ``.csv``) and rejects bad
input with the same one-line messages.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO, Literal

import numpy as np

from modelfuse.errors import DataError

__all__ = [
    "check_labels",
    "check_predictions",
    "load_array",
    "looks_like_probabilities",
    "resolve_kind",
]

PredictionKind = Literal["probabilities", "logits"]
KindOption = Literal["auto", "probabilities", "logits"]
KIND_OPTIONS: tuple[str, ...] = ("auto", "probabilities", "logits")


def load_array(path: str | Path, *, key: str | None = None) -> np.ndarray:
    """Load one array from ``.npy``, ``.npz`` or ``.csv``.

    Parameters
    ----------
    path : str or Path
        The file. A ``.npz`` holding one array needs no ``key``; with several,
        ``key`` names the one to read (or use ``FILE.npz:KEY`` as the path).
        A ``.csv`` is read as numbers; a header line is skipped when present.
    key : str, optional
        The array's name inside a ``.npz``.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    DataError
        The file is missing, unreadable, of an unknown type, or empty.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.npy")
    >>> np.save(p, np.eye(2)); load_array(p).shape
    (2, 2)
    """
    text = str(path)
    if key is None and text.endswith(".npz") is False and ".npz:" in text:
        text, key = text.split(".npz:", 1)
        text += ".npz"
    p = Path(text)
    if not p.is_file():
        raise DataError(f"{p}: no such file; give the path of a .npy, .npz or .csv file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            with p.open("rb") as handle:
                _check_npy_header(handle, p.stat().st_size, source=str(p))
                handle.seek(0)
                array = np.lib.format.read_array(handle, allow_pickle=False)
        elif suffix == ".npz":
            array = _load_npz_member(p, key)
        elif suffix == ".csv":
            array = _load_csv(p)
        else:
            raise DataError(f"{p}: unknown file type {suffix!r}; expected .npy, .npz or .csv")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: cannot be read as {suffix} ({_short(exc)})") from None
    if array.size == 0:
        raise DataError(f"{p}: the array is empty (shape {array.shape}); expected data")
    return array


def _short(value: object, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_npy_header(handle: IO[bytes], available: int, *, source: str) -> None:
    """Refuse a ``.npy`` header whose shape needs more bytes than ``available`` after it.

    Reads only the header (at most ``max_header_size`` bytes), so a file of a
    few bytes that claims 10^12 rows is refused before anything is allocated.
    """
    from numpy.lib import format as npy

    start = handle.tell()
    try:
        version = npy.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(handle)
        else:  # (3, 0): the 2.0 layout with a UTF-8 header; read by numpy's own reader
            shape, _, dtype = npy._read_array_header(handle, version)  # noqa: SLF001
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise DataError(f"{source}: not a valid .npy header ({_short(exc)})") from None
    if dtype.hasobject:
        raise DataError(
            f"{source}: holds Python objects (dtype {dtype}); expected numbers, "
            "saved with numpy.save from a numeric array"
        )
    count = 1
    for n in shape:
        count *= int(n)
    needed = count * dtype.itemsize
    left = available - (handle.tell() - start)
    if needed > left:
        raise DataError(
            f"{source}: the header claims shape {_short(shape, 60)} of {dtype} "
            f"({needed} bytes) but only {max(left, 0)} bytes follow it; "
            "the file is truncated or corrupt"
        )


def _load_npz_member(path: Path, key: str | None) -> np.ndarray:
    """One array of a ``.npz``, its header checked against the member's size first."""
    with zipfile.ZipFile(path) as archive:
        members = {
            info.filename[: -len(".npy")]: info
            for info in archive.infolist()
            if info.filename.endswith(".npy")
        }
        names = list(members)
        if key is None:
            if len(names) != 1:
                listed = ", ".join(n[:40] for n in names[:10]) + (
                    ", ..." if len(names) > 10 else ""
                )
                raise DataError(
                    f"{path}: holds {len(names)} arrays ({listed}); name one as {path}:NAME"
                )
            key = names[0]
        if key not in members:
            listed = ", ".join(n[:40] for n in names[:10]) or "none"
            raise DataError(f"{path}: no array named {key[:60]!r}; it holds {listed}")
        info = members[key]
        archive_size = path.stat().st_size
        # deflate expands at most about 1032 times; a member claiming more lies
        if info.compress_size > archive_size or (
            info.file_size > max(info.compress_size, 1) * 1100
            if info.compress_type != zipfile.ZIP_STORED
            else info.file_size > info.compress_size
        ):
            raise DataError(
                f"{path}: the entry {key[:60]!r} claims {info.file_size} bytes, more than "
                f"the archive of {archive_size} bytes can hold; the file is corrupt"
            )
        with archive.open(info) as handle:
            _check_npy_header(handle, info.file_size, source=f"{path}:{key[:60]}")
        with archive.open(info) as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)


def _load_csv(path: Path) -> np.ndarray:
    with path.open() as handle:
        first = handle.readline()
    cells = [c.strip() for c in first.split(",")]
    skip = 0
    try:
        [float(c) for c in cells if c]
    except ValueError:
        skip = 1  # a header line
    array = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=1)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    return array


def check_predictions(
    predictions: np.ndarray,
    kind: PredictionKind,
    *,
    source: str = "predictions",
    atol: float = 1e-3,
    option: str | None = None,
) -> np.ndarray:
    """Check an array of predictions and return it as floating point.

    Parameters
    ----------
    predictions : array of shape (..., n_classes)
        Probabilities or logits; the last axis holds the classes.
    kind : {"probabilities", "logits"}
        What the numbers are. Never guessed: probabilities must be in [0, 1]
        and sum to one over the last axis (within ``atol``).
    source : str
        Names the file or argument in error messages.
    atol : float
        Tolerance on the sums of probabilities.
    option : str, optional
        The command-line option that set ``kind`` (``"--kind"``): messages
        then say ``pass --kind logits``; without it they name the keyword
        (``pass kind='logits'``).

    Raises
    ------
    DataError
        Empty, not at least 2-D, NaN or inf, or probabilities that do not sum to one.

    Examples
    --------
    >>> import numpy as np
    >>> check_predictions(np.array([[1, 0]]), "probabilities").dtype
    dtype('float64')
    >>> check_predictions(np.array([[2.0, -1.0]]), "probabilities", option="--kind")
    Traceback (most recent call last):
    ...
    modelfuse.errors.DataError: predictions: probabilities must lie in [0, 1], got values in [-1, 2]; pass --kind logits if these are logits
    """
    hint = f"{option} logits" if option else "kind='logits'"
    if kind not in ("probabilities", "logits"):
        raise DataError(
            f"{source}: kind must be 'probabilities' or 'logits', got {str(kind)[:40]!r}"
        )
    array = np.asarray(predictions)
    if array.size == 0:
        raise DataError(f"{source}: the array is empty (shape {array.shape}); expected predictions")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{source}: expected real numbers, got dtype {array.dtype}")
    if array.ndim < 2:
        raise DataError(
            f"{source}: expected shape (n_samples, n_classes), got {array.shape}; "
            "for a binary score give two columns (1 - p, p)"
        )
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        where = np.argwhere(~finite)[0]
        raise DataError(
            f"{source}: {int((~finite).sum())} NaN or inf values, the first at index "
            f"{tuple(int(i) for i in where)}; remove or repair them"
        )
    if kind == "probabilities":
        if array.min() < -atol or array.max() > 1 + atol:
            raise DataError(
                f"{source}: probabilities must lie in [0, 1], got values in "
                f"[{array.min():.4g}, {array.max():.4g}]; pass {hint} if these are logits"
            )
        sums = array.sum(axis=-1)
        bad = np.abs(sums - 1) > atol
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(
                f"{source}: probabilities must sum to 1 over the last axis, but "
                f"{int(bad.sum())} rows do not (row {first} sums to {sums[first]:.6g}); "
                f"pass {hint} if these are logits"
            )
    return array


def check_labels(
    labels: np.ndarray,
    *,
    n_samples: int | None = None,
    n_classes: int | None = None,
    source: str = "labels",
) -> np.ndarray:
    """Check integer class labels and return them as ``int64``.

    Parameters
    ----------
    labels : array of shape (n_samples,)
    n_samples : int, optional
        The expected length (that of the predictions).
    n_classes : int, optional
        Labels must lie in ``[0, n_classes)``.
    source : str
        Names the file or argument in error messages.

    Raises
    ------
    DataError
        Empty, not 1-D, not integral, NaN, wrong length, or outside the class range.
    """
    array = np.asarray(labels)
    if array.size == 0:
        raise DataError(f"{source}: the array is empty; expected one label per sample")
    if array.ndim != 1:
        raise DataError(f"{source}: expected shape (n_samples,), got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{source}: expected integer class labels, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{source}: contains NaN or inf; expected integer class labels")
        if not np.all(array == np.round(array)):
            raise DataError(f"{source}: expected integer class labels, got fractional values")
    array = array.astype(np.int64)
    if n_samples is not None and array.shape[0] != n_samples:
        raise DataError(
            f"{source}: {array.shape[0]} labels for {n_samples} predictions; "
            "expected one label per sample"
        )
    if array.min() < 0 or (n_classes is not None and array.max() >= n_classes):
        hi = "" if n_classes is None else f" for {n_classes} classes"
        raise DataError(
            f"{source}: labels must lie in [0, {n_classes if n_classes is not None else 'n'})"
            f"{hi}, got values in [{array.min()}, {array.max()}]"
        )
    return array


def looks_like_probabilities(predictions: np.ndarray, *, atol: float = 1e-3) -> bool:
    """Whether every row of ``predictions`` is a probability distribution over the last axis.

    True when the array is real, finite, at least 2-D, every value lies in
    ``[-atol, 1 + atol]`` and every row sums to 1 within ``atol``.

    Examples
    --------
    >>> import numpy as np
    >>> looks_like_probabilities(np.array([[0.2, 0.8], [1.0, 0.0]]))
    True
    >>> looks_like_probabilities(np.array([[2.0, -1.0], [0.3, 0.1]]))
    False
    """
    array = np.asarray(predictions)
    if array.ndim < 2 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return False
    if np.issubdtype(array.dtype, np.complexfloating) or not np.isfinite(array).all():
        return False
    if array.min() < -atol or array.max() > 1 + atol:
        return False
    return bool(np.all(np.abs(array.sum(axis=-1) - 1) <= atol))


def resolve_kind(
    predictions: np.ndarray,
    kind: str,
    *,
    source: str = "predictions",
    option: str = "--kind",
    atol: float = 1e-3,
) -> PredictionKind:
    """What ``predictions`` hold: ``kind``, or the data's own answer when ``kind`` is ``"auto"``.

    ``"auto"`` takes arrays whose rows are probability distributions (see
    :func:`looks_like_probabilities`) as probabilities and anything else as
    logits. An explicit kind that the data contradict is refused, so a
    probability file is never read as logits (or the reverse) in silence.

    Parameters
    ----------
    predictions : array of shape (..., n_classes)
    kind : {"auto", "probabilities", "logits"}
    source : str
        Names the file in error messages.
    option : str
        The option that set ``kind``, named in error messages (``--kind`` on
        the command line).

    Raises
    ------
    DataError
        ``kind`` is unknown, or contradicts the data.

    Examples
    --------
    >>> import numpy as np
    >>> resolve_kind(np.array([[0.2, 0.8]]), "auto")
    'probabilities'
    >>> resolve_kind(np.array([[3.0, -1.0]]), "auto")
    'logits'
    """
    if kind not in KIND_OPTIONS:
        raise DataError(f"{option}: expected auto, probabilities or logits, got {str(kind)[:40]!r}")
    array = np.asarray(predictions)
    is_distribution = looks_like_probabilities(array, atol=atol)
    if kind == "auto":
        return "probabilities" if is_distribution else "logits"
    if kind == "logits" and is_distribution:
        raise DataError(
            f"{source}: every row is a probability distribution, not logits; "
            f"pass {option} probabilities (or {option} auto)"
        )
    usable = array.ndim >= 2 and array.size > 0 and np.issubdtype(array.dtype, np.number)
    if kind == "probabilities" and usable and not is_distribution:
        real = not np.issubdtype(array.dtype, np.complexfloating)
        if real and np.isfinite(array).all():
            raise DataError(
                f"{source}: the rows are not probability distributions (values in "
                f"[{array.min():.4g}, {array.max():.4g}], or rows not summing to 1); "
                f"if these are logits pass {option} logits (or {option} auto)"
            )
    return kind  # type: ignore[return-value]
