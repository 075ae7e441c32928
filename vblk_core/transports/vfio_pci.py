"""vfio-pci transport: a virtio-blk PCI function driven from user space through VFIO.

One session is one open of the function (vfio.py) and one virtio initialisation (spec 3.1):

    open container/group/device -> config space: identity, capabilities, MSI-X -> Memory
    Space + Bus Master -> mmap the BARs -> reset -> ACKNOWLEDGE|DRIVER -> features ->
    FEATURES_OK -> device config -> MAP_DMA our memfd at an IOVA -> per queue: size,
    addresses, MSI-X vector wired to its call eventfd, enable -> DRIVER_OK
    ... kicks are 16-bit stores into the notify area of the BAR ...
    close: reset, MSI-X off, UNMAP_DMA, unmap BARs, close the fds

The device's DMA goes through the IOMMU (VIRTIO_F_ACCESS_PLATFORM is required), so it sees
our memory at the IOVA chosen here: the same on every reconnect.  Reconnecting means opening
and resetting the same function again.  Loss is noticed through an epoll fd over the config
change interrupt (DEVICE_NEEDS_RESET) and VFIO's error and request interrupts.  The status
steps are virtio_status's; the common configuration structure (virtio_pci.CommonCfg) is
their primitives.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import struct
import sys
import threading
from collections.abc import Callable, Iterator

from ..errors import ConnectError, DeviceError, TransportError
from ..eventfd import eventfd_clear_holding_gil
from ..layout import MAX_QUEUE_SIZE
from ..transport import Kicker, MemoryMap, Transport
from ..virtio import VirtioFeature
from .vfio import (
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_REQ_IRQ_INDEX,
    Buffer,
    OsVfioOps,
    VfioDevice,
    VfioOps,
    normalize_pci_address,
)
from .virtio_pci import (
    BLK_CONFIG_WIDTHS,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_STD_CONFIG_SIZE,
    CommonCfg,
    FileKicker,
    FileWindow,
    MappedWindow,
    MmioKicker,
    VirtioCap,
    Window,
    parse_config_space,
)
from .virtio_status import LEGACY_REFUSAL, VirtioStatus

log = logging.getLogger("vblk")

IOVA_ALIGN = 2 << 20
CONFIG_READ_ATTEMPTS = 10
#: The features this transport cannot do without, and why.
REQUIRED_FEATURES = {**LEGACY_REFUSAL, VirtioFeature.ACCESS_PLATFORM:
                     "its DMA would bypass the IOMMU (QEMU: add iommu_platform=on to -device "
                     "virtio-blk-pci)"}


class VfioPciConnector:
    """Makes sessions with the virtio-blk function at ``pci_address`` (bound to vfio-pci);
    every reconnect opens and resets the same function.  ``timeout`` bounds device resets;
    ``ops`` replaces the system calls (unit tests)."""

    def __init__(self, pci_address: str, *, timeout: float = 5.0,
                 ops: VfioOps | None = None) -> None:
        self.address = normalize_pci_address(pci_address)
        self.timeout = timeout
        self.ops = ops
        self.target = VfioPciTransport.describe(self.address)

    def connect(self) -> VfioPciTransport:
        return VfioPciTransport(self.address, timeout=self.timeout, ops=self.ops)


class VfioPciTransport(Transport):
    """One session with a virtio-blk PCI function through VFIO (a Transport)."""

    def __init__(self, pci_address: str, *, timeout: float = 5.0,
                 ops: VfioOps | None = None) -> None:
        """Open the function, check it, map its BARs, reset it, ACKNOWLEDGE|DRIVER.
        Raises ConnectError naming the step and the fix, DeviceError if it is malformed."""
        self.address = normalize_pci_address(pci_address)
        self.target = self.describe(self.address)
        self.timeout = timeout
        self.ops: VfioOps = ops or OsVfioOps()
        self._lock = threading.Lock()
        self._closed = self._negotiated = self._msix_on = False
        self._status: VirtioStatus | None = None   # once the common config is reachable
        self._dev = VfioDevice(self.address, self.ops, self.target)
        self._buffers: list[Buffer] = []
        self._views: list[memoryview] = []
        self._mapped: dict[tuple[int, int], memoryview] = {}   # (BAR, area offset) -> view
        self._windows: dict[str, Window] = {}
        self._kickers: list[MmioKicker | FileKicker] = []
        self._dma: list[tuple[int, int, int]] = []     # user address, size, iova
        self._efds: dict[int, int] = {}                # VFIO IRQ index (or -1: config) -> fd
        self._wired: list[int] = []                    # ERR/REQ indexes with an eventfd
        self._epoll: select.epoll | None = None
        try:
            with self._step():
                self._open()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def describe(address: str) -> str:
        """How messages name the function at ``address`` (normalized): the transport's and
        its connector's ``target``."""
        return f"vfio-pci device {address}"

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """Refuse use after close; turn a register access failure during set-up into a
        ConnectError."""
        if self._closed:
            raise TransportError(f"the session with {self.target} is closed")
        try:
            yield
        except TransportError as e:
            if type(e) is TransportError and not self._running:
                raise ConnectError(f"{self.target}: {e}", e.errno) from None
            raise

    # --- opening --------------------------------------------------------------------------

    def _open(self) -> None:
        dev = self._dev
        dev.open()
        cfg = dev.read_config(0, PCI_STD_CONFIG_SIZE)
        bar_sizes = {i: dev.regions[i].size for i in range(6)}
        self.layout = layout = parse_config_space(cfg, bar_sizes, self.target)
        vectors = min(layout.msix_vectors, dev.irq_counts[VFIO_PCI_MSIX_IRQ_INDEX])
        if vectors < 1:
            raise ConnectError(f"{self.target} has no usable MSI-X (capability table size "
                               f"{layout.msix_vectors}, VFIO offers "
                               f"{dev.irq_counts[VFIO_PCI_MSIX_IRQ_INDEX]} vectors): this "
                               "driver needs MSI-X for completions", errno.ENOTSUP)
        # Memory Space before touching the BARs; Bus Master (DMA) once the device is reset.
        self._command(PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER)
        for name, cap in (("common config", layout.common), ("notify area", layout.notify),
                          ("device config", layout.device)):
            self._windows[name] = self._window(name, cap)
        #: How each structure is reached, "mmap" or "pread/pwrite" (for diagnostics).
        self.access = {name: "mmap" if isinstance(w, MappedWindow) else "pread/pwrite"
                       for name, w in self._windows.items()}
        self.common = common = CommonCfg(self._windows["common config"])
        self._status = status = VirtioStatus(common, self.target)
        status.reset(self.timeout)
        self._command(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0)
        status.acknowledge()
        num_queues = common.num_queues
        if num_queues < 1:
            raise DeviceError(f"{self.target} reports {num_queues} virtqueues")
        self._queue_size0 = self._device_queue_size(0)
        # One vector per queue; vector 0 for config changes if there is one to spare.
        self._config_vector = vectors > num_queues
        self._first_vector = 1 if self._config_vector else 0
        self._max_queues = min(num_queues, vectors - self._first_vector)
        self._open_loss_sources()

    def _command(self, set_bits: int, clear_bits: int) -> None:
        """Set and clear bits of the PCI command register; check the set ones stay set."""
        read = self._dev.read_config
        cmd = struct.unpack("<H", read(PCI_COMMAND, 2))[0]
        self._dev.write_config(PCI_COMMAND, struct.pack("<H", (cmd | set_bits) & ~clear_bits))
        cmd = struct.unpack("<H", read(PCI_COMMAND, 2))[0]
        if cmd & set_bits != set_bits:
            raise ConnectError(f"{self.target}: Memory Space / Bus Master do not stay set in "
                               f"the PCI command register (reads {cmd:#06x})")

    def _window(self, name: str, cap: VirtioCap) -> Window:
        region = self._dev.regions[cap.bar]
        label = f"the {name} (BAR {cap.bar} + {cap.offset:#x})"
        if sys.byteorder == "little":   # memoryview casts are native-endian; virtio is LE
            for area_off, area_size in region.mmap_areas:
                if area_off <= cap.offset and cap.offset + cap.length <= area_off + area_size:
                    base = self._mapped.get((cap.bar, area_off))
                    if base is None:
                        try:
                            buf = self.ops.mmap(self._dev.fd, area_size,
                                                region.offset + area_off)
                        except (OSError, ValueError) as e:   # ValueError: Python's own checks
                            log.debug("vblk: %s: cannot mmap BAR %d (%s): using pread/pwrite",
                                      self.target, cap.bar, e)
                            break
                        self._buffers.append(buf)
                        base = self._mapped[(cap.bar, area_off)] = memoryview(buf)
                        self._views.append(base)
                    start = cap.offset - area_off
                    view = base[start:start + cap.length]
                    self._views.append(view)
                    return MappedWindow(label, view)
        return FileWindow(label, self.ops, self._dev.fd, region.offset + cap.offset, cap.length)

    @property
    def _running(self) -> bool:
        return self._status is not None and self._status.started

    def _device_queue_size(self, index: int) -> int:
        self.common.select(index)
        size = self.common.read16(CommonCfg.QUEUE_SIZE)
        if size == 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise DeviceError(f"{self.target} reports queue size {size} for queue {index}: "
                              f"must be a power of two up to {MAX_QUEUE_SIZE}")
        return size

    def _open_loss_sources(self) -> None:
        self._epoll = select.epoll()
        sources = [-1] if self._config_vector else []
        for index in (VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX):
            if self._dev.irq_counts.get(index, 0) >= 1:
                sources.append(index)
        for index in sources:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._efds[index] = fd
            self._epoll.register(fd, select.EPOLLIN)
            if index >= 0:
                try:
                    self._dev.set_irqs(index, 0, [fd])
                    self._wired.append(index)
                except ConnectError as e:
                    log.debug("vblk: %s: not watching VFIO IRQ %d: %s", self.target, index, e)

    # --- the Transport interface ------------------------------------------------------------

    def negotiate(self, driver_features: int) -> int:
        """Features and FEATURES_OK.  The driver also takes VERSION_1 and ACCESS_PLATFORM,
        both required; the latter (transport business) is not in the returned set."""
        with self._lock, self._step():
            assert self._status is not None, "set by _open"
            features = self._status.negotiate(driver_features, VirtioFeature.ACCESS_PLATFORM,
                                              REQUIRED_FEATURES)
            self._negotiated = True
            return features

    def read_config(self, size: int) -> bytes:
        """The device config (at most its structure's length), read between two equal
        config_generation values."""
        with self._lock, self._step():
            window = self._windows["device config"]
            for _ in range(CONFIG_READ_ATTEMPTS):
                before = self.common.generation
                data = window.read_bytes(size, BLK_CONFIG_WIDTHS)
                if self.common.generation == before:
                    return data
            raise DeviceError(f"{self.target}: the device config kept changing "
                              f"(config_generation) over {CONFIG_READ_ATTEMPTS} reads")

    @property
    def max_queues(self) -> int:
        return self._max_queues

    @property
    def max_queue_size(self) -> int:
        return self._queue_size0

    def map_memory(self, memory: MemoryMap) -> int:
        """VFIO_IOMMU_MAP_DMA of the whole region, read/write, at the lowest 2 MiB-aligned
        IOVA (not 0) in the valid ranges: the same on every session."""
        with self._lock, self._step():
            for user_addr, size, iova in self._dma:
                if (user_addr, size) == (memory.user_addr, memory.size):
                    return iova
            iova = self._choose_iova(memory.size)
            self._dev.map_dma(memory.user_addr, iova, memory.size)
            self._dma.append((memory.user_addr, memory.size, iova))
            return iova

    def _choose_iova(self, size: int) -> int:
        pgsizes = self._dev.iova_pgsizes
        align = max(IOVA_ALIGN, pgsizes & -pgsizes)
        floor = max([iova + sz for _, sz, iova in self._dma] + [align])
        for first, last in self._dev.iova_ranges:
            iova = -(-max(first, floor) // align) * align
            if iova + size - 1 <= last:
                return iova
        ranges = ", ".join(f"[{a:#x}, {b:#x}]" for a, b in self._dev.iova_ranges)
        raise ConnectError(f"{self.target}: {size} bytes of memory fit no valid IOVA range "
                           f"({ranges})", errno.ENOMEM)

    def setup_queue(self, index: int, size: int, desc_addr: int, avail_addr: int,
                    used_addr: int, call_fd: int) -> Kicker:
        with self._lock, self._step():
            if not self._negotiated or self._running:
                raise ConnectError(f"{self.target}: setup_queue({index}) out of order")
            if not 0 <= index < self._max_queues:
                raise ConnectError(f"{self.target} offers {self._max_queues} queues (limited "
                                   f"by its queues and MSI-X vectors), not {index + 1}")
            common = self.common
            device_max = self._device_queue_size(index)   # selects the queue
            if device_max < size:
                raise ConnectError(f"{self.target}: queue {index} holds at most {device_max} "
                                   f"entries, not {size}: use queue-size={device_max} or less")
            common.write16(CommonCfg.QUEUE_SIZE, size)
            common.write64(CommonCfg.QUEUE_DESC, desc_addr)
            common.write64(CommonCfg.QUEUE_DRIVER, avail_addr)
            common.write64(CommonCfg.QUEUE_DEVICE, used_addr)
            if not self._msix_on:
                self._enable_msix()
            vector = self._first_vector + index
            self._dev.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, vector, [call_fd])
            got = common.set_vector(CommonCfg.QUEUE_MSIX_VECTOR, vector)
            if got != vector:
                raise ConnectError(f"{self.target}: queue {index} refused MSI-X vector {vector} "
                                   f"(queue_msix_vector reads {got:#x})", errno.ENOSPC)
            kicker = self._kicker(index, common.read16(CommonCfg.QUEUE_NOTIFY_OFF))
            common.write16(CommonCfg.QUEUE_ENABLE, 1)
            return kicker

    def _enable_msix(self) -> None:
        """Enable MSI-X with every vector we may use (VFIO cannot grow the set later on older
        kernels); vector 0 goes to config changes when there is one to spare."""
        fds = [-1] * (self._first_vector + self._max_queues)
        if self._config_vector:
            fds[0] = self._efds[-1]
        self._dev.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, fds)
        self._msix_on = True
        if self._config_vector:
            got = self.common.set_vector(CommonCfg.CONFIG_MSIX_VECTOR, 0)
            if got != 0:
                log.debug("vblk: %s refused MSI-X vector 0 for config changes (%#x)",
                          self.target, got)

    def _kicker(self, index: int, notify_off: int) -> MmioKicker | FileKicker:
        notify = self.layout.notify
        off = notify_off * notify.multiplier
        if off % 2 or off + 2 > notify.length:
            raise DeviceError(f"{self.target}: queue {index}'s notify address (queue_notify_off "
                              f"{notify_off} x {notify.multiplier}) is outside the "
                              f"{notify.length:#x}-byte notify area or misaligned")
        window = self._windows["notify area"]
        kicker: MmioKicker | FileKicker
        if isinstance(window, MappedWindow):
            kicker = MmioKicker(window.slot16(off), index)
        else:
            assert isinstance(window, FileWindow)
            kicker = FileKicker(self.ops, self._dev.fd, window.file_offset + off, index)
        self._kickers.append(kicker)
        return kicker

    def start(self) -> None:
        with self._lock, self._step():
            assert self._status is not None, "set by _open"
            self._status.start()

    def loss_fd(self) -> int:
        epoll = self._epoll
        return epoll.fileno() if epoll is not None and not self._closed and self._efds else -1

    def loss_reason(self) -> str | None:
        with self._lock:
            if self._closed or self._epoll is None or self._status is None:
                return f"the session with {self.target} is closed"
            fired = {fd for fd, _ in self._epoll.poll(0)}
            for fd in fired:
                eventfd_clear_holding_gil(fd)
            if self._efds.get(VFIO_PCI_REQ_IRQ_INDEX) in fired:
                return (f"the kernel asked for {self.target} back (vfio-pci is being unbound "
                        "or the device removed)")
            if self._efds.get(VFIO_PCI_ERR_IRQ_INDEX) in fired:
                return f"{self.target} reported an uncorrectable PCI error"
            return self._status.loss_reason()

    def close(self) -> None:
        """Reset the device, MSI-X off, unmap DMA and BARs, close the fds (idempotent,
        never raises)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for kicker in self._kickers:
                kicker.disarm()
            if self._status is not None:
                self._quietly(self._close_reset)
            if self._msix_on:
                self._quietly(functools.partial(self._dev.disable_irqs, VFIO_PCI_MSIX_IRQ_INDEX))
            for index in self._wired:
                self._quietly(functools.partial(self._dev.disable_irqs, index))
            for _user_addr, size, iova in self._dma:
                self._quietly(functools.partial(self._dev.unmap_dma, iova, size))
            self._dma.clear()
            for window in self._windows.values():
                window.release()
            for view in reversed(self._views):
                view.release()
            for buf in self._buffers:
                self._quietly(functools.partial(self.ops.munmap, buf))
            self._views.clear()
            self._mapped.clear()
            self._buffers.clear()
            self._dev.close()
            if self._epoll is not None:
                self._epoll.close()
            for fd in self._efds.values():
                self._quietly(functools.partial(os.close, fd))

    def _close_reset(self) -> None:
        assert self._status is not None
        try:
            self._status.reset(min(self.timeout, 1.0))
        finally:
            self._command(0, PCI_COMMAND_MASTER)

    def _quietly(self, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - close() never raises
            log.debug("vblk: closing %s: %s", self.target, e)
