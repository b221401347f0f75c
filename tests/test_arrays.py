"""modelfuse.arrays: kind resolution on hand-made arrays, and files that claim more than they hold."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy

from modelfuse.arrays import check_predictions, load_array, looks_like_probabilities, resolve_kind
from modelfuse.errors import DataError

# ----- resolve_kind: auto, explicit, and contradictions -----

PROBS = np.array([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])  # every row a distribution
LOGITS = np.array([[2.0, -1.0], [0.3, 0.1], [0.0, 0.0]])  # negative values, rows not summing to 1
# in [0, 1] but rows summing to 0.4 and 1.2: not distributions, so logits
SMALL = np.array([[0.1, 0.3], [0.6, 0.6]])


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (PROBS, "probabilities"),
        (LOGITS, "logits"),
        (SMALL, "logits"),
        (np.array([[0.2, 0.8005]]), "probabilities"),  # sums to 1.0005: within atol 1e-3
        (np.array([[0.2, 0.802]]), "logits"),  # sums to 1.002: outside
        (np.array([[1.0005, -0.0005]]), "probabilities"),  # values within atol of [0, 1]
        (np.array([[1.01, -0.01]]), "logits"),
        (np.zeros((2, 3, 4)) + 0.25, "probabilities"),  # last axis of a 3-D array
        (np.array([[0, 1], [1, 0]]), "probabilities"),  # integers
    ],
)
def test_auto_takes_distributions_as_probabilities(array: np.ndarray, expected: str) -> None:
    assert resolve_kind(array, "auto") == expected
    assert looks_like_probabilities(array) == (expected == "probabilities")


def test_an_explicit_kind_that_agrees_is_returned() -> None:
    assert resolve_kind(PROBS, "probabilities") == "probabilities"
    assert resolve_kind(LOGITS, "logits") == "logits"


def test_probabilities_given_as_logits_are_refused_naming_the_flag() -> None:
    with pytest.raises(DataError) as info:
        resolve_kind(PROBS, "logits", source="val.npy")
    assert str(info.value) == (
        "val.npy: every row is a probability distribution, not logits; "
        "pass --kind probabilities (or --kind auto)"
    )


def test_logits_given_as_probabilities_are_refused_naming_the_flag() -> None:
    with pytest.raises(DataError) as info:
        resolve_kind(LOGITS, "probabilities", source="val.npy")
    message = str(info.value)
    assert message.startswith("val.npy: the rows are not probability distributions")
    assert "[-1, 2]" in message  # the range of the values, as in the array above
    assert message.endswith("pass --kind logits (or --kind auto)")


def test_the_option_name_is_used_in_messages() -> None:
    with pytest.raises(DataError, match="pass --score-kind probabilities"):
        resolve_kind(PROBS, "logits", option="--score-kind")


def test_an_unknown_kind_is_refused_and_shortened() -> None:
    with pytest.raises(DataError) as info:
        resolve_kind(PROBS, "x" * 1000)
    assert "expected auto, probabilities or logits" in str(info.value)
    assert len(str(info.value)) < 120


def test_non_finite_or_malformed_arrays_are_left_to_the_checks() -> None:
    # resolve_kind does not guess on NaN; check_predictions then names the NaN
    nan = np.array([[0.5, np.nan]])
    assert resolve_kind(nan, "probabilities") == "probabilities"
    assert resolve_kind(nan, "auto") == "logits"
    with pytest.raises(DataError, match="1 NaN or inf values"):
        check_predictions(nan, "probabilities")


def test_check_predictions_names_the_flag_when_asked() -> None:
    with pytest.raises(DataError) as info:
        check_predictions(np.array([[0.3, 0.3]]), "probabilities", source="p.npy", option="--kind")
    assert "pass --kind logits if these are logits" in str(info.value)
    assert "kind='logits'" not in str(info.value)
    with pytest.raises(DataError, match="pass kind='logits'"):  # the Python API's wording
        check_predictions(np.array([[0.3, 0.3]]), "probabilities")


# ----- load_array: headers checked against the real size -----


def _npy_bytes(shape: tuple[int, ...], dtype: str = "<f8", payload: bytes = b"\0" * 48) -> bytes:
    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def test_a_npy_claiming_a_trillion_rows_is_refused_without_allocating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(_npy_bytes((10**12, 3)))
    before = bomb.read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_array(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000
    assert str(info.value) == (
        f"{bomb}: the header claims shape (1000000000000, 3) of float64 (24000000000000 bytes) "
        "but only 48 bytes follow it; the file is truncated or corrupt"
    )
    assert bomb.read_bytes() == before


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_npz_member_claiming_a_trillion_rows_is_refused(tmp_path: Path, compression) -> None:
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=compression) as archive:
        archive.writestr("logits.npy", _npy_bytes((10**12, 3)))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="claims shape \\(1000000000000, 3\\)") as info:
            load_array(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000
    assert str(info.value).startswith(f"{bomb}:logits: ")


def test_a_npz_entry_claiming_more_than_its_archive_can_hold_is_refused(tmp_path: Path) -> None:
    data = _npy_bytes((6,), payload=np.arange(6.0).tobytes())
    good = tmp_path / "good.npz"
    with zipfile.ZipFile(good, "w") as archive:
        archive.writestr("a.npy", data)
    np.testing.assert_array_equal(load_array(good), np.arange(6.0))
    # patch the stored entry's uncompressed size (local header and central directory) to 2**31
    raw = bytearray(good.read_bytes())
    size = len(data).to_bytes(4, "little")
    huge = (2**31).to_bytes(4, "little")
    for start in (raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")):
        offset = start + (22 if raw[start + 2] == 3 else 24)
        assert raw[offset : offset + 4] == size
        raw[offset : offset + 4] = huge
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="claims 2147483648 bytes, more than the archive"):
        load_array(bad)


def test_object_arrays_and_bad_headers_are_refused(tmp_path: Path) -> None:
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="holds Python objects"):
        load_array(objects)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f8'}  \n")
    with pytest.raises(DataError, match="not a valid .npy header"):
        load_array(garbage)
    short = tmp_path / "short.npy"
    short.write_bytes(b"\x93NUM")
    with pytest.raises(DataError, match=f"{short}: not a valid .npy header"):
        load_array(short)


def test_well_formed_files_still_load(tmp_path: Path) -> None:
    a = np.arange(12.0).reshape(4, 3)
    np.save(tmp_path / "a.npy", a)
    np.savez_compressed(tmp_path / "b.npz", x=a, y=a[:, 0])
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    np.testing.assert_array_equal(load_array(tmp_path / "a.npy"), a)
    np.testing.assert_array_equal(load_array(tmp_path / "f.npy"), a)
    np.testing.assert_array_equal(load_array(f"{tmp_path / 'b.npz'}:y"), a[:, 0])
    with pytest.raises(DataError, match="holds 2 arrays \\(x, y\\); name one as"):
        load_array(tmp_path / "b.npz")
    with pytest.raises(DataError, match="no array named 'z'; it holds x, y"):
        load_array(f"{tmp_path / 'b.npz'}:z")


def test_a_csv_of_a_million_columns_in_one_line_stays_bounded(tmp_path: Path) -> None:
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(["0.5"] * 1_000_000) + "\n")
    tracemalloc.start()
    try:
        array = load_array(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert array.shape == (1_000_000,)
    assert peak < 60 * wide.stat().st_size  # proportional to the file, about 4 MB here
    with pytest.raises(DataError, match="expected shape \\(n_samples, n_classes\\)"):
        check_predictions(array, "logits", source=str(wide))
