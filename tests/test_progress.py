import io
import re

from rich.console import Console

from modelfuse.progress import byte_speed, progress_bar


def test_byte_speed_is_gigabytes_over_seconds():
    assert byte_speed(0.5, 4.0) == "125 MB/s"  # 0.125 GB/s
    assert byte_speed(5.0, 2.0) == "2.50 GB/s"
    assert byte_speed(1.0, 0.0) == "? MB/s"


def test_the_bar_shows_bytes_per_second_not_items_per_second():
    """The bar counts tensors; its speed column must be the bytes' rate (rich's own
    transfer column would print the tensors per second as bytes per second)."""
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    with progress_bar("merging", 100, total_bytes=2_000_000_000, console=console) as advance:
        for _ in range(100):
            advance(1, 20_000_000)
    text = out.getvalue()
    assert "2.00/2.00 GB" in text
    speeds = re.findall(r"([\d.]+) (MB|GB)/s", text)
    assert speeds, text[-300:]
    assert "bytes/s" not in text
