"""parse_size against hand-computed byte counts."""

from __future__ import annotations

import pytest

from modelfuse.checkpoint import parse_size
from modelfuse.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("2GiB", 2 * 1024**3),
        ("1048576", 1048576),
        (1048576, 1048576),
        ("1.5GB", 1_500_000_000),
        (" 10 kb ", 10_000),
        ("3MiB", 3 * 1024**2),
        ("7G", 7_000_000_000),
        ("1TB", 10**12),
        ("12B", 12),
    ],
)
def test_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("junk", ["", "abc", "5 GBs", "-1GB", "0", 0, "1e9", "GB", True, 2.5, None])
def test_junk_is_a_config_error(junk: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(junk)  # type: ignore[arg-type]
    message = str(caught.value)
    assert repr(junk) in message and "'5GB'" in message
