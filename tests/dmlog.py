"""Reading the log of qemu's blklogwrites filter: what reached the device, in order.

A ``blklogwrites`` node stacked between the daemon's file node and its format node (qsd_argv's
``filters=``) appends an entry to its log node for every write, flush, FUA write and discard it
receives, in the dm-log-writes format (Linux's drivers/md/dm-log-writes.c, as read by
xfstests' replay-log).  Written here from that format's description:

    sector 0           super: le64 magic 0x6a736677736872, le64 version 1, le64 nr_entries,
                       le32 sector size (the log's own sector, ``log-sector-size``, 512 default)
    sector 1, 2, ...   one entry per sector: le64 sector, le64 nr_sectors, le64 flags,
                       le64 data_len; a write's data follows in the next nr_sectors sectors
                       (sectors in units of the log's sector size)

Flags: FLUSH 1 (a flush; no data), FUA 2, DISCARD 4 (nr_sectors discarded, no data), MARK 8.
qemu logs a write-zeroes as a write of zeroes (MAY_UNMAP is not recorded), and skips a flush
when nothing was written since the last one.

The super is only written now and then (every ``log-super-update-interval`` entries, and at
close), so the entries are read until the first empty one; the log file must start empty.
Each entry is written before the request completes, so once a client has its reply, the entry
is in the file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x6A736677736872
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8


class LogError(AssertionError):
    """The log is not a dm-log-writes log, or is cut short."""


@dataclass(frozen=True)
class Entry:
    index: int            # position in the log, from 0
    offset: int           # byte offset on the device
    length: int           # bytes written or discarded
    flags: int
    data_at: int          # where the written bytes are in the log file (writes only)

    @property
    def kind(self) -> str:
        if self.flags & FLUSH:
            return "flush"
        if self.flags & DISCARD:
            return "discard"
        if self.flags & MARK:
            return "mark"
        return "write"

    @property
    def fua(self) -> bool:
        return bool(self.flags & FUA)

    def __str__(self) -> str:
        if self.kind == "flush":
            return "flush"
        return f"{self.kind}({self.offset}+{self.length}{' fua' if self.fua else ''})"


class WriteLog:
    """A parsed log: ``entries`` in the order the filter received them."""

    def __init__(self, data: bytes, sector_size: int = 512) -> None:
        self.raw = data
        magic, version, nr_entries, super_sector_size = SUPER.unpack_from(
            data.ljust(SUPER.size, b"\0"))
        if magic == version == nr_entries == super_sector_size == 0:
            # qemu writes the super only every log-super-update-interval entries and at
            # close; before that, the entries follow an empty first sector
            pass
        elif magic != MAGIC or version != 1:
            raise LogError(f"not a dm-log-writes log: magic {magic:#x}, version {version}")
        elif super_sector_size != sector_size:
            raise LogError(f"log sector size {super_sector_size}, expected {sector_size}")
        self.sector_size = ss = sector_size
        self.entries: list[Entry] = []
        pos = ss
        while pos + ENTRY.size <= len(data):
            sector, nr, flags, _data_len = ENTRY.unpack_from(data, pos)
            if not (sector or nr or flags):
                break
            has_data = not flags & (FLUSH | DISCARD | MARK)
            data_at = pos + ss
            if has_data and data_at + nr * ss > len(data):
                raise LogError(f"entry {len(self.entries)}: its {nr} sectors of data are cut off")
            self.entries.append(Entry(len(self.entries), sector * ss, nr * ss, flags,
                                      data_at if has_data else -1))
            pos = data_at + (nr * ss if has_data else 0)
        if nr_entries > len(self.entries):
            raise LogError(f"the super counts {nr_entries} entries, only "
                           f"{len(self.entries)} found")

    @classmethod
    def read(cls, path: str | Path, sector_size: int = 512) -> WriteLog:
        """Parse the log file at ``path`` (``sector_size``: blklogwrites' log-sector-size)."""
        return cls(Path(path).read_bytes(), sector_size)

    def since(self, mark: int) -> list[Entry]:
        """The entries after the first ``mark`` (e.g. ``len(log.entries)`` of an earlier read)."""
        return self.entries[mark:]

    def payload(self, entry: Entry) -> bytes:
        """The bytes a write entry wrote."""
        if entry.data_at < 0:
            raise ValueError(f"{entry} carries no data")
        return self.raw[entry.data_at:entry.data_at + entry.length]

    def last_flush(self) -> int:
        """Index of the last flush entry, -1 if there is none."""
        for e in reversed(self.entries):
            if e.kind == "flush":
                return e.index
        return -1

    def replay(self, image: bytearray, upto: int | None = None) -> bytearray:
        """Apply the entries (all, or those before index ``upto``) to ``image`` in order:
        writes copy their data, discards zero their range (a discarded range reads as zeroes
        on the daemon's file node).  Returns ``image``."""
        for e in self.entries[:upto]:
            if e.kind == "write":
                image[e.offset:e.offset + e.length] = self.payload(e)
            elif e.kind == "discard":
                image[e.offset:e.offset + e.length] = bytes(e.length)
        return image

    def durable(self, size: int, base: bytes | None = None) -> bytearray:
        """The device's content as of the last flush the device received: the initial
        content (``base``, default zeroes) with every entry up to that flush applied.  What
        a crash right now could not lose."""
        image = bytearray(base) if base is not None else bytearray(size)
        return self.replay(image, self.last_flush() + 1)
