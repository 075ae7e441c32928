"""Test data and how to compare it: one ``pattern`` and one ``first_difference``."""
from __future__ import annotations

BytesLike = bytes | bytearray | memoryview


def pattern(length: int, seed: int = 0, base: int = 0) -> bytes:
    """Deterministic, position-tagged bytes: every 512-byte sector names ``seed`` and its
    absolute offset (``base`` + its position), so no two sectors are alike and a sector found
    anywhere says where it came from.  ASCII only (never 0x80-0xff)."""
    out = bytearray(length)
    for pos in range(0, length, 512):
        n = min(512, length - pos)
        tag = f"<{seed}:{base + pos}>".encode()
        out[pos:pos + n] = (tag * (512 // len(tag) + 1))[:n]
    return bytes(out)


def first_difference(a: BytesLike, b: BytesLike) -> int | None:
    """Offset of the first differing byte of two buffers (None if equal; the shorter length
    if one is a prefix of the other).  Cheap on equal buffers, and avoids pytest's diff of
    megabytes of bytes."""
    x, y = memoryview(a).cast("B"), memoryview(b).cast("B")
    if x == y:
        return None
    n = min(len(x), len(y))
    lo, step = 0, 1 << 20
    while lo < n and x[lo:lo + step] == y[lo:lo + step]:
        lo += step
    for i in range(lo, min(lo + step, n)):
        if x[i] != y[i]:
            return i
    return n


def assert_same_bytes(actual: BytesLike, expected: BytesLike, what: str, base: int = 0) -> None:
    """Raise AssertionError naming the first differing byte (offset ``base`` + position)."""
    x, y = memoryview(actual).cast("B"), memoryview(expected).cast("B")
    if len(x) != len(y):
        raise AssertionError(f"{what}: length {len(x)} != expected {len(y)}")
    pos = first_difference(x, y)
    if pos is not None:
        raise AssertionError(
            f"{what}: first difference at byte {base + pos} (sector {(base + pos) // 512}): "
            f"got {bytes(x[pos:pos + 16]).hex()} expected {bytes(y[pos:pos + 16]).hex()}")
