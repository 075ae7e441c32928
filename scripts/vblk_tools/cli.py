"""argparse value types shared by the scripts."""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "4096", "4k", "512M", "1G", "1GiB", "1gb", "1.5G" (binary units, whole
    bytes).  Raises ValueError for anything else."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 256M, 1G)")
    number, unit = m.group(1), m.group(2).lower()
    size = float(number) * _UNITS[unit]
    if size != int(size):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def size_arg(text: str) -> int:
    """parse_size for argparse."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nonnegative(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` (int or float), refusing negative numbers."""
    def check(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
        return v
    return check
