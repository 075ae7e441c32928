"""Split-virtqueue memory layout: pure arithmetic, no I/O.

One queue occupies ``end_offset`` bytes:

    0             descriptor table   16 bytes x queue_size
    avail_offset  available ring     flags, idx, ring[queue_size], used_event  (u16 each)
    used_offset   used ring          flags, idx, ring[queue_size] {u32 id, u32 len}, avail_event
                                     (at 4 mod 8: every 8-byte element is 8-aligned)
    req_offset    per-request data   one ``req_type`` slot per descriptor (header + status)
    end_offset    next queue         (multiple of 16, so queue i starts at i * end_offset)
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

DESC_SIZE = 16
#: The largest split ring the virtio spec allows (2.7): the one definition of that limit.
MAX_QUEUE_SIZE = 32768


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass(frozen=True)
class VirtqueueLayout:
    num_queues: int
    queue_size: int
    avail_offset: int
    used_offset: int
    req_offset: int
    req_size: int
    end_offset: int

    @staticmethod
    def new(num_queues: int, queue_size: int, req_type: type[ctypes.Structure]) -> VirtqueueLayout:
        """Compute the layout of ``num_queues`` queues of ``queue_size`` entries.

        Raises ValueError("Invalid queue size") unless queue_size is a power of two in
        1..MAX_QUEUE_SIZE, and ValueError for num_queues < 1.
        """
        if (not isinstance(queue_size, int) or queue_size <= 0 or queue_size > MAX_QUEUE_SIZE
                or queue_size & (queue_size - 1)):
            raise ValueError("Invalid queue size")
        if not isinstance(num_queues, int) or num_queues < 1:
            raise ValueError("Invalid number of queues")
        desc_table_size = DESC_SIZE * queue_size
        avail_ring_size = 2 * (3 + queue_size)
        used_ring_size = 2 * 3 + 8 * queue_size
        req_size = ctypes.sizeof(req_type)
        avail_offset = desc_table_size
        # The spec asks 4-byte alignment of the used ring; we put it at 4 mod 8 so that each
        # 8-byte used element (after the 4-byte flags+idx) is 8-aligned and never straddles a
        # page.  QEMU's virtio-pci device writes an element that crosses an IOMMU page
        # boundary to the wrong address (its len is lost: a read looks short).
        used_offset = align_up(avail_offset + avail_ring_size + 4, 8) - 4
        req_offset = align_up(used_offset + used_ring_size, ctypes.alignment(req_type))
        end_offset = align_up(req_offset + req_size * queue_size, 16)
        return VirtqueueLayout(num_queues, queue_size, avail_offset, used_offset,
                               req_offset, req_size, end_offset)

    @property
    def total_size(self) -> int:
        """Bytes needed for all queues in one contiguous allocation."""
        return self.num_queues * self.end_offset
