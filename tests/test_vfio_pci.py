"""The vfio-pci transport against a fake VFIO stack and virtio-blk PCI function
(tests/fake_vfio.py): capability-list parsing, every set-up error, the status handshake, queue
set-up, DMA mapping, loss detection, close, and a whole BlockDevice moving data byte for byte
(with the BARs through pread/pwrite and through mmap).  The real device (QEMU's
virtio-blk-pci behind an emulated IOMMU) is for the in-guest test."""
from __future__ import annotations

import errno
import os
import random
import select
import struct
import threading
import time
from pathlib import Path

import pytest

from fake_ring_device import qsd_like_config
from fake_vfio import (
    ACCESS_PLATFORM,
    ADDR,
    FEATURES_OK,
    MSIX,
    QEMU_FEATURES,
    REQ,
    VERSION_1,
    FakeBlkFunction,
    FakeVfio,
    VCap,
    config_space,
    make_sysfs,
    qemu_caps,
    split_caps,
)
from vblk_core import BlockDevice, ConfigError, ConnectError, DeviceError
from vblk_core.memory import SharedRegion
from vblk_core.transport import MemoryMap
from vblk_core.transports import vfio as uapi
from vblk_core.transports.vfio_pci import VfioPciConnector, VfioPciTransport
from vblk_core.transports.virtio_pci import (
    CfgType,
    MappedWindow,
    MmioKicker,
    parse_config_space,
)
from vblk_core.virtio_blk import DRIVER_FEATURES

DISK = 4 << 20
QEMU_BARS = {1: 0x1000, 4: 0x4000}
SMALL = {"bounce_buffer_size": 64 << 10, "bounce_buffers": 8, "request_timeout": 5}


class Env:
    """A fake function + VFIO stack in a tmp sysfs; every transport made is closed at
    teardown, and the fake must then hold no fd, mapping or interrupt, and no errors."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made: list[tuple[FakeVfio, FakeBlkFunction]] = []
        self.transports: list[VfioPciTransport] = []
        self.devices: list[BlockDevice] = []

    def fake(self, *, sysfs: dict | None = None, **fn_kw) -> tuple[FakeVfio, FakeBlkFunction]:
        disk = fn_kw.pop("disk", None) or bytearray(random.Random(4).randbytes(DISK))
        config = fn_kw.pop("config", None) or qsd_like_config(DISK, 2)
        fn = FakeBlkFunction(disk, config, **fn_kw)
        root = self.tmp_path / f"f{len(self.made)}"
        fake = FakeVfio(make_sysfs(root, **(sysfs or {})), fn)
        self.made.append((fake, fn))
        return fake, fn

    def connect(self, fake: FakeVfio, timeout: float = 2.0) -> VfioPciTransport:
        t = VfioPciConnector(ADDR, timeout=timeout, ops=fake).connect()
        self.transports.append(t)
        return t

    def open(self, fake: FakeVfio, **options) -> BlockDevice:
        for k, v in SMALL.items():
            options.setdefault(k, v)
        dev = BlockDevice.open(VfioPciConnector(ADDR, ops=fake), **options)
        self.devices.append(dev)
        return dev

    def connect_error(self, fake: FakeVfio, cls: type[Exception] = ConnectError) -> Exception:
        with pytest.raises(cls) as info:
            self.connect(fake)
        assert fake.fds == {}, "a failed connect left files open"
        return info.value

    def finish(self) -> None:
        for dev in self.devices:
            dev.close()
        for t in self.transports:
            t.close()
        for fake, fn in self.made:
            fn.close()
            assert fake.fds == {}, f"left open: {fake.fds}"
            assert fake.maps == {} and fake.irqs == {}
            assert not fn.errors, fn.errors


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    yield e
    e.finish()


def _rings(t: VfioPciTransport, index: int, size: int = 64, base: int = 0x200000):
    return (index, size, base + 0x10000 * index, base + 0x10000 * index + 16 * size,
            base + 0x10000 * index + 0x8000)


# --- the uapi ------------------------------------------------------------------------------

def test_ioctl_numbers_and_struct_sizes_match_linux_vfio_h():
    assert (uapi.VFIO_GET_API_VERSION, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SET_IOMMU) == (
        0x3B64, 0x3B65, 0x3B66)
    assert (uapi.VFIO_GROUP_GET_STATUS, uapi.VFIO_GROUP_SET_CONTAINER,
            uapi.VFIO_GROUP_GET_DEVICE_FD) == (0x3B67, 0x3B68, 0x3B6A)
    assert (uapi.VFIO_DEVICE_GET_INFO, uapi.VFIO_DEVICE_GET_REGION_INFO,
            uapi.VFIO_DEVICE_GET_IRQ_INFO, uapi.VFIO_DEVICE_SET_IRQS) == (
        0x3B6B, 0x3B6C, 0x3B6D, 0x3B6E)
    assert (uapi.VFIO_IOMMU_GET_INFO, uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA) == (
        0x3B70, 0x3B71, 0x3B72)
    sizes = (uapi.GROUP_STATUS, uapi.DEVICE_INFO, uapi.REGION_INFO, uapi.IRQ_INFO,
             uapi.IRQ_SET, uapi.IOMMU_INFO, uapi.DMA_MAP, uapi.DMA_UNMAP, uapi.CAP_HEADER)
    assert [s.size for s in sizes] == [8, 20, 32, 16, 20, 24, 32, 24, 8]


# --- capability list ---------------------------------------------------------------------------

def test_qemu_layout_is_parsed():
    layout = parse_config_space(bytes(config_space(qemu_caps())), QEMU_BARS, "dev")
    assert (layout.common.bar, layout.common.offset, layout.common.length) == (4, 0, 0x1000)
    assert (layout.isr.bar, layout.isr.offset) == (4, 0x1000)
    assert (layout.device.bar, layout.device.offset) == (4, 0x2000)
    assert (layout.notify.bar, layout.notify.offset, layout.notify.multiplier) == (4, 0x3000, 4)
    assert layout.msix_vectors == 3
    assert layout.device_id == 0x1042


def test_the_first_usable_instance_of_a_structure_is_used():
    # a COMMON naming a reserved BAR, QEMU's, then another usable one in BAR 1
    caps = [VCap(1, 9, 0, 0x1000), *qemu_caps(), VCap(1, 1, 0, 0x1000)]
    layout = parse_config_space(bytes(config_space(caps)), QEMU_BARS, "dev")
    assert (layout.common.bar, layout.common.position) == (4, 0x54)


def test_unknown_and_pci_cfg_capabilities_are_ignored():
    caps = [VCap(5, 0, 0, 0), VCap(8, 2, 0, 0x100), *qemu_caps()]
    assert parse_config_space(bytes(config_space(caps)), QEMU_BARS, "dev").common.bar == 4


def _parse_error(cfg: bytearray, bars: dict[int, int] = QEMU_BARS) -> str:
    with pytest.raises(DeviceError) as info:
        parse_config_space(bytes(cfg), bars, "dev")
    return str(info.value)


def test_a_capability_loop_is_an_error_not_a_hang():
    cfg = config_space(qemu_caps())
    cfg[0x40 + 20 * 3 + 1] = 0x54              # the 4th cap points back to the 2nd
    assert "loops" in _parse_error(cfg)


@pytest.mark.parametrize("pointer", [0x30, 0xFF, 0x42, 0x100 - 1])
def test_capability_pointers_outside_config_space_or_unaligned(pointer):
    cfg = config_space(qemu_caps())
    cfg[0x40 + 1] = pointer
    assert "pointer" in _parse_error(cfg)


def test_capability_list_pointer_itself_is_checked():
    cfg = config_space(qemu_caps())
    cfg[0x34] = 0x3C
    assert "0x3c" in _parse_error(cfg)


def test_a_capability_naming_a_bar_beyond_5_cannot_be_used():
    caps = qemu_caps()
    caps[0] = VCap(1, 6, 0, 0x1000)
    message = _parse_error(config_space(caps), {**QEMU_BARS, 6: 0x1000})
    assert "COMMON" in message and "names BAR 6" in message


@pytest.mark.parametrize("index,cap_len", [(0, 12), (3, 16)])
def test_truncated_capabilities(index, cap_len):
    caps = qemu_caps()
    caps[index].cap_len = cap_len               # a cap, or the notify cap without its multiplier
    assert "truncated" in _parse_error(config_space(caps))


def test_a_capability_running_off_config_space_is_truncated():
    cfg = config_space(qemu_caps(), msix_vectors=None)
    struct.pack_into("<BBBBBBxx", cfg, 0xF8, 0x09, 0, 16, 4, 4, 0)
    cfg[0x40 + 20 * 3 + 1] = 0xF8
    assert "truncated" in _parse_error(cfg)


def test_a_truncated_msix_capability():
    cfg = config_space(qemu_caps(), msix_vectors=None)
    cfg[0xF8:0xFA] = bytes([0x11, 0])
    cfg[0x40 + 20 * 3 + 1] = 0xF8
    assert "MSI-X" in _parse_error(cfg)


@pytest.mark.parametrize("missing", [1, 2, 4])
def test_missing_structures(missing):
    caps = [c for c in qemu_caps() if c.cfg_type != missing]
    assert f"no usable virtio {CfgType(missing).name}" in _parse_error(config_space(caps))


def test_a_structure_past_the_end_of_its_bar():
    caps = qemu_caps()
    caps[2] = VCap(4, 4, 0x3800, 0x1000)
    message = _parse_error(config_space(caps))
    assert "DEVICE" in message and "past the end of BAR 4" in message


def test_a_structure_in_an_absent_bar():
    assert "past the end of BAR 4" in _parse_error(config_space(qemu_caps()), {1: 0x1000})


@pytest.mark.parametrize("cap", [VCap(1, 4, 2, 0x1000), VCap(1, 4, 0, 0x20)])
def test_misaligned_or_short_common_config(cap):
    caps = qemu_caps()
    caps[0] = cap
    assert "COMMON" in _parse_error(config_space(caps))


def test_notify_multiplier_must_be_a_power_of_two():
    caps = qemu_caps()
    caps[3].multiplier = 6
    assert "notify_off_multiplier 6" in _parse_error(config_space(caps))


def test_short_config_space_and_no_capability_list():
    assert "expected at least" in _parse_error(config_space(qemu_caps())[:0x30])
    cfg = config_space(qemu_caps())
    cfg[0x06] = 0
    assert "no PCI capability list" in _parse_error(cfg)


@pytest.mark.parametrize("vendor,device,subsystem,ok", [
    (0x1AF4, 0x1042, 2, True), (0x1AF4, 0x1001, 2, True), (0x1AF4, 0x1001, 1, False),
    (0x1AF4, 0x1041, 1, False), (0x8086, 0x1042, 2, False)])
def test_only_virtio_blk_functions(vendor, device, subsystem, ok):
    cfg = config_space(qemu_caps(), vendor=vendor, device=device, subsystem=subsystem)
    if ok:
        parse_config_space(bytes(cfg), QEMU_BARS, "dev")
        return
    with pytest.raises(ConnectError) as info:
        parse_config_space(bytes(cfg), QEMU_BARS, "dev")
    assert info.value.errno == errno.ENODEV and "not a virtio-blk function" in str(info.value)


# --- finding and opening the device --------------------------------------------------------

def test_pci_addresses_are_normalized_and_checked():
    assert VfioPciConnector("00:04.0").target == "vfio-pci device 0000:00:04.0"
    assert VfioPciConnector("0000:3B:00.1").address == "0000:3b:00.1"
    with pytest.raises(ConfigError):
        VfioPciConnector("/dev/vfio/7")


def test_no_such_pci_device(env):
    fake, _ = env.fake(sysfs={"addr": "0000:00:05.0"})
    e = env.connect_error(fake)
    assert e.errno == errno.ENODEV and "no PCI device 0000:00:04.0: check lspci -D" in str(e)


def test_no_iommu_group(env):
    fake, _ = env.fake(sysfs={"group": None})
    e = env.connect_error(fake)
    assert "no IOMMU group" in str(e) and "intel_iommu=on" in str(e)


def test_noiommu_group_is_refused(env):
    fake, _ = env.fake(sysfs={"noiommu": True})
    assert "noiommu" in str(env.connect_error(fake))


@pytest.mark.parametrize("driver,now", [("virtio-pci", "bound to virtio-pci"),
                                        (None, "bound to no driver")])
def test_not_bound_to_vfio_pci_says_how(env, driver, now):
    fake, _ = env.fake(sysfs={"driver": driver})
    message = str(env.connect_error(fake))
    assert now in message
    for step in ("echo vfio-pci > ", "/driver_override", f"echo {ADDR} > ", "/drivers_probe"):
        assert step in message
    assert ("/driver/unbind" in message) == bool(driver)


def test_a_group_that_is_not_viable_names_the_other_devices(env):
    fake, _ = env.fake(sysfs={"others": {"0000:00:05.0": "e1000e",
                                         "0000:00:06.0": "vfio-pci"}})
    fake.viable = False
    message = str(env.connect_error(fake))
    assert "not viable" in message and "0000:00:05.0 (bound to e1000e)" in message
    assert "0000:00:06.0" not in message


@pytest.mark.parametrize("path,code,words", [
    ("/dev/vfio/7", errno.EACCES, "permission denied"),
    ("/dev/vfio/vfio", errno.EACCES, "permission denied"),
    ("/dev/vfio/7", errno.EBUSY, "another process"),
    ("/dev/vfio/vfio", errno.ENOENT, "modprobe vfio-pci")])
def test_opening_the_vfio_files(env, path, code, words):
    fake, _ = env.fake()
    fake.open_errors[path] = code
    e = env.connect_error(fake)
    assert e.errno == code and words in str(e) and path in str(e)


def test_the_device_busy_in_another_session(env):
    fake, _ = env.fake()
    fake.fail["GROUP_GET_DEVICE_FD"] = errno.EBUSY
    e = env.connect_error(fake)
    assert e.errno == errno.EBUSY and "VFIO_GROUP_GET_DEVICE_FD" in str(e)
    assert "another process" in str(e)


def test_set_iommu_eperm_means_no_interrupt_remapping(env):
    fake, _ = env.fake()
    fake.fail["SET_IOMMU"] = errno.EPERM
    e = env.connect_error(fake)
    assert e.errno == errno.EPERM and "no interrupt remapping" in str(e)
    assert "intremap=on" in str(e)


def test_api_version_and_iommu_type(env):
    fake, _ = env.fake()
    fake.api_version = 1
    assert "API version 1" in str(env.connect_error(fake))
    fake.api_version = 0
    fake.extensions = {}
    assert "vfio_iommu_type1" in str(env.connect_error(fake))
    fake.extensions = {1: 1}                     # TYPE1 only: still fine
    env.connect(fake).close()
    assert fake.iommu is None                    # closed again (was set to 1 while open)


def test_type1v2_is_preferred(env):
    fake, _ = env.fake()
    env.connect(fake)
    assert fake.iommu == 3


def test_not_a_virtio_blk_function_through_connect(env):
    fake, _ = env.fake(cfg=config_space(qemu_caps(), device=0x1041, subsystem=1))
    e = env.connect_error(fake)
    assert e.errno == errno.ENODEV and "1af4:1042" in str(e)


def test_no_msix(env):
    fake, _ = env.fake(cfg=config_space(qemu_caps(), msix_vectors=None))
    assert "no usable MSI-X" in str(env.connect_error(fake))


def test_memory_space_then_bus_master_after_the_reset_then_bus_master_cleared(env):
    fake, fn = env.fake()
    struct.pack_into("<H", fn.cfg, 4, 0x4)        # a previous owner left Bus Master on
    seen = []
    write = fake.pwrite

    def pwrite(fd, data, offset):
        if offset == (7 << fake.OFFSET_SHIFT) + 4:              # config space: command
            seen.append(("command", int.from_bytes(data, "little")))
        elif offset == (4 << fake.OFFSET_SHIFT) + 0x14:         # BAR4 common: device_status
            seen.append(("status", data[0]))
        return write(fd, data, offset)

    fake.pwrite = pwrite
    t = env.connect(fake)
    assert seen[:3] == [("command", 0x2), ("status", 0), ("command", 0x6)]
    assert fn.command() & 0x6 == 0x6
    t.close()
    assert fn.command() & 0x4 == 0


# --- the status handshake --------------------------------------------------------------------

def test_handshake_order_and_features(env):
    fake, fn = env.fake()
    fn.status = 0x0F                        # a previous owner left it running
    t = env.connect(fake)
    features = t.negotiate(DRIVER_FEATURES)
    statuses = [v for s, off, v in fn.log if s == "common" and off == 0x14]
    assert statuses == [0, 1, 3, 11]
    assert fn.driver_features == QEMU_FEATURES & (DRIVER_FEATURES | ACCESS_PLATFORM)
    assert fn.driver_features & (ACCESS_PLATFORM | VERSION_1) == ACCESS_PLATFORM | VERSION_1
    assert features == fn.driver_features & ~ACCESS_PLATFORM
    assert fn.status & FEATURES_OK


def test_features_ok_that_does_not_stick(env):
    fake, _ = env.fake(accept_features=False)
    t = env.connect(fake)
    with pytest.raises(ConnectError) as info:
        t.negotiate(DRIVER_FEATURES)
    assert "FEATURES_OK did not stick" in str(info.value) and "VERSION_1" in str(info.value)
    assert "ACCESS_PLATFORM" in str(info.value)


def test_a_device_without_access_platform_is_refused(env):
    fake, _ = env.fake(features=QEMU_FEATURES & ~ACCESS_PLATFORM)
    with pytest.raises(ConnectError) as info:
        env.connect(fake).negotiate(DRIVER_FEATURES)
    assert "ACCESS_PLATFORM" in str(info.value) and "iommu_platform=on" in str(info.value)


def test_a_legacy_device_is_refused(env):
    fake, _ = env.fake(features=QEMU_FEATURES & ~VERSION_1)
    with pytest.raises(ConnectError, match="VERSION_1"):
        env.connect(fake).negotiate(DRIVER_FEATURES)


def test_a_reset_that_never_completes_is_bounded(env):
    fake, fn = env.fake(reset_completes=False)
    fn.status = 0x0F
    start = time.monotonic()
    with pytest.raises(ConnectError) as info:
        VfioPciConnector(ADDR, timeout=0.2, ops=fake).connect()
    assert time.monotonic() - start < 2
    assert info.value.errno == errno.ETIMEDOUT and "reset" in str(info.value)
    assert fake.fds == {}


# --- queues ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_queues,vectors,max_queues,config_vector", [
    (2, 3, 2, 0), (4, 3, 3, 0xFFFF), (2, 2, 2, 0xFFFF), (1, 1, 1, 0xFFFF)])
def test_queue_count_is_capped_by_msix_vectors(env, num_queues, vectors, max_queues,
                                               config_vector):
    fake, fn = env.fake(num_queues=num_queues, msix_vectors=vectors)
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    assert t.max_queues == max_queues and t.max_queue_size == 256
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        for q in range(max_queues):
            t.setup_queue(*_rings(t, q), call)
        assert fn.msix_config == config_vector
        first = 1 if config_vector == 0 else 0
        assert [q.vector for q in fn.queues[:max_queues]] == [first + i
                                                              for i in range(max_queues)]
        with pytest.raises(ConnectError, match="offers"):
            t.setup_queue(*_rings(t, max_queues), call)
    finally:
        t.close()
        os.close(call)


def test_queue_registers(env):
    fake, fn = env.fake()
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    t.setup_queue(1, 128, 0x1_2345_6000, 0x1_2345_7000, 0x2_0000_0000, call)
    q = fn.queues[1]
    assert (q.size, q.enable, q.vector) == (128, 1, 2)
    assert q.addr == {0x20: 0x23456000, 0x24: 1, 0x28: 0x23457000, 0x2C: 1, 0x30: 0, 0x34: 2}
    assert fake.irq_count[MSIX] == 3        # every vector enabled at once
    os.eventfd_write(fake.irqs[MSIX][2], 1)  # the vector is wired to this call eventfd
    assert os.eventfd_read(call) == 1
    t.close()
    os.close(call)


def test_a_refused_msix_vector(env):
    fake, _ = env.fake(refuse_vectors={2})
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        t.setup_queue(*_rings(t, 0), call)
        with pytest.raises(ConnectError, match="queue 1 refused MSI-X vector 2"):
            t.setup_queue(*_rings(t, 1), call)
    finally:
        t.close()
        os.close(call)


def test_a_queue_smaller_than_asked(env):
    fake, _ = env.fake(queue_max=[256, 64])
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        t.setup_queue(*_rings(t, 0, 128), call)
        with pytest.raises(ConnectError, match="queue 1 holds at most 64 entries, not 128"):
            t.setup_queue(*_rings(t, 1, 128), call)
    finally:
        t.close()
        os.close(call)


def test_block_device_sees_the_devices_queue_size(env):
    fake, _ = env.fake(queue_max=64)
    with pytest.raises(ConfigError, match="accepts up to 64"):   # max_queue_size, queue 0
        env.open(fake, queue_size=128)


@pytest.mark.parametrize("size", [0, 100, 65535])
def test_nonsense_queue_sizes(env, size):
    fake, _ = env.fake(queue_max=size)
    assert f"queue size {size}" in str(env.connect_error(fake, DeviceError))


def test_zero_queues(env):
    fake, _ = env.fake(num_queues=0, queue_max=[256])
    assert "0 virtqueues" in str(env.connect_error(fake, DeviceError))


def test_a_notify_offset_outside_the_notify_area(env):
    fake, fn = env.fake()
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    fn.queues[0].notify_off = 0x400             # x4 = 0x1000: just past the area
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with pytest.raises(DeviceError, match="notify"):
            t.setup_queue(*_rings(t, 0), call)
    finally:
        t.close()
        os.close(call)


def test_mmio_kick_is_one_16_bit_store_at_the_slot():
    bar = bytearray(b"\xee" * 64)
    window = MappedWindow("notify", memoryview(bar)[16:48])
    kicker = MmioKicker(window.slot16(8), 0x0102)
    kicker.kick()
    assert bar[24:26] == b"\x02\x01" and bar[16:24] == b"\xee" * 8 and bar[26:] == b"\xee" * 38
    kicker.disarm()
    kicker.kick()                                  # after close: goes nowhere, no error
    window.release()
    assert bar[24:26] == b"\x02\x01"


# --- memory and config -------------------------------------------------------------------------

def test_memory_is_mapped_at_2mib_in_a_valid_range_and_again_at_the_same_iova(env, region):
    fake, _ = env.fake()
    fake.iova_ranges = [(0x1000, 0x1FFFFF), (0x10000000, 0x7FFFFFFFFF)]
    iovas = []
    for _ in range(2):                          # a session, then a reconnect
        t = env.connect(fake)
        iova = t.map_memory(MemoryMap(region.fd, region.base_addr, region.size))
        assert fake.maps == {iova: (region.base_addr, region.size)}
        assert t.map_memory(MemoryMap(region.fd, region.base_addr, region.size)) == iova
        iovas.append(iova)
        t.close()
        assert fake.maps == {}
    assert iovas == [0x10000000, 0x10000000]
    fake.iova_ranges = [(0, 0xFFFFF)]
    t = env.connect(fake)
    with pytest.raises(ConnectError, match="fit no valid IOVA range"):
        t.map_memory(MemoryMap(region.fd, region.base_addr, region.size))
    t.close()
    fake.iova_ranges = [(0, 0x7FFFFFFFFF)]
    fake.fail["MAP_DMA"] = errno.ENOMEM
    t = env.connect(fake)
    with pytest.raises(ConnectError, match="locked-memory limit"):
        t.map_memory(MemoryMap(region.fd, region.base_addr, region.size))
    t.close()


def test_config_is_read_from_the_device_structure_consistently(env):
    config = qsd_like_config(DISK, 2)
    fake, fn = env.fake(config=config, generation_flips=3)
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    assert t.read_config(60) == config[:60]
    assert fn.generation_flips == 0               # it did retry


def test_config_that_keeps_changing(env):
    fake, _ = env.fake(generation_flips=1 << 20)
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    with pytest.raises(DeviceError, match="kept changing"):
        t.read_config(60)


def test_config_read_is_bounded_by_the_structure_length(env):
    caps = qemu_caps()
    caps[2] = VCap(4, 4, 0x2000, 12)
    config = qsd_like_config(DISK, 2)
    fake, _ = env.fake(caps=caps, config=config)
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    assert t.read_config(60) == config[:12]


# --- loss and close ----------------------------------------------------------------------------

@pytest.fixture
def region():
    r = SharedRegion(1 << 20)
    yield r
    r.close()


def _started(env, fake, region):
    """A session set up as the block device does it (memory mapped, queue 0, DRIVER_OK)."""
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    base = t.map_memory(MemoryMap(region.fd, region.base_addr, region.size))
    call = os.eventfd(0, os.EFD_NONBLOCK)
    t.setup_queue(*_rings(t, 0, base=base), call)
    t.start()
    return t, call


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0.5)[0])


def test_needs_reset_is_noticed_through_the_config_interrupt(env, region):
    fake, fn = env.fake()
    t, call = _started(env, fake, region)
    fd = t.loss_fd()
    assert fd >= 0 and not _readable(fd) and t.loss_reason() is None
    os.eventfd_write(fake.irqs[MSIX][0], 1)         # a config change that is harmless
    assert _readable(fd) and t.loss_reason() is None
    assert not select.select([fd], [], [], 0)[0]      # drained: no busy loop in the monitor
    fn.needs_reset()
    assert _readable(fd)
    assert "DEVICE_NEEDS_RESET" in t.loss_reason()
    t.close()
    os.close(call)


def test_the_kernel_asking_for_the_device_back(env, region):
    fake, _ = env.fake()
    t, call = _started(env, fake, region)
    os.eventfd_write(fake.irqs[REQ][0], 1)
    assert _readable(t.loss_fd()) and "asked for" in t.loss_reason()
    t.close()
    os.close(call)


def test_a_device_reset_behind_our_back(env, region):
    fake, fn = env.fake()
    t, call = _started(env, fake, region)
    fn.status = 0
    assert "was reset" in t.loss_reason()
    t.close()
    assert "closed" in t.loss_reason() and t.loss_fd() == -1
    os.close(call)


def test_close_releases_everything_and_never_raises(env, region):
    fake, fn = env.fake(caps=split_caps(), mmappable={2})
    t, call = _started(env, fake, region)
    assert fn.running and fake.maps and fake.irqs
    fake.fail.update(SET_IRQS=errno.EIO, UNMAP_DMA=errno.EIO)
    t.close()
    t.close()
    assert not fn.running and fn.status == 0
    assert fake.fds == {} and all(m.closed for m in fake.mmaps)
    with pytest.raises(Exception, match="closed"):
        t.negotiate(DRIVER_FEATURES)
    os.close(call)


def test_start_checks_driver_ok(env):
    fake, fn = env.fake()
    t = env.connect(fake)
    t.negotiate(DRIVER_FEATURES)
    fn.status |= 64
    with pytest.raises(ConnectError, match="did not start"):
        t.start()


# --- a whole block device ----------------------------------------------------------------------

def _read_some(dev: BlockDevice, n: int) -> None:
    buf = bytearray(4096)
    for i in range(n):
        dev.pread(buf, i * 4096)


LAYOUTS = {
    "bars-by-pread-pwrite": {},
    "notify-and-config-mmapped": {"caps": split_caps(), "mmappable": {2}},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_data_reaches_the_device_byte_for_byte(env, layout):
    fake, fn = env.fake(**LAYOUTS[layout])
    dev = env.open(fake, num_queues=2)
    assert [len(m) for m in fake.mmaps] == ([0x2000] if fn.mmappable else [])  # BAR2, once
    assert (dev.num_queues, dev.capacity, dev.read_only) == (2, DISK, False)
    data = random.Random(5).randbytes(300 << 10)
    dev.pwrite(data, 8192, fua=True)
    assert fn.disk[8192:8192 + len(data)] == data
    buf = bytearray(len(data) + 4096)
    dev.pread(buf, 4096)
    assert bytes(buf) == bytes(fn.disk[4096:4096 + len(buf)])
    dev.write_zeroes(0, 4096)
    assert fn.disk[:4096] == bytes(4096)
    assert dev.get_id() == b"fake-blk"
    # A second thread gets the second queue: both queues' notify and MSI-X vector work.
    other = threading.Thread(target=_read_some, args=(dev, 16))
    other.start()
    _read_some(dev, 16)
    other.join()
    queues = dev.stats()["queues"]
    assert [q["requests"] > 0 and q["kicks"] > 0 and q["calls"] > 0 for q in queues] == [
        True, True], queues
    mapped = dict(fake.maps)
    dev.close()
    assert fake.maps == {} and fake.irqs == {} and fake.fds == {} and fn.status == 0
    # explicitly, not only as a side effect of closing the fds
    assert fake.unmapped == [(iova, size) for iova, (_, size) in mapped.items()]
    assert fake.disabled == [MSIX, REQ]


def test_access_reports_how_each_structure_is_reached(env):
    fake, _ = env.fake(caps=split_caps(), mmappable={2})
    assert env.connect(fake).access == {"common config": "pread/pwrite",
                                        "notify area": "mmap", "device config": "mmap"}


def test_sparse_mmap_areas_are_honoured(env):
    fake, fn = env.fake(caps=split_caps(), mmappable={2})
    fake.sparse[2] = [(0x1000, 0x1000)]          # the notify area only, not the device config
    dev = env.open(fake, num_queues=1)
    assert [(len(m), m.closed) for m in fake.mmaps] == [(0x1000, False)]
    data = random.Random(6).randbytes(64 << 10)
    dev.pwrite(data, 0)
    assert fn.disk[:len(data)] == data
    dev.close()


def test_reconnect_after_the_device_needs_a_reset(env):
    fake, fn = env.fake()
    dev = env.open(fake, num_queues=2, reconnect_timeout=10)
    dev.pwrite(b"a" * 4096, 0)
    fn.needs_reset()
    deadline = time.monotonic() + 10
    while dev.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.reconnects == 1 and fake.opens == 2
    dev.pwrite(b"b" * 4096, 4096)
    buf = bytearray(8192)
    dev.pread(buf, 0)
    assert bytes(buf) == b"a" * 4096 + b"b" * 4096 == bytes(fn.disk[:8192])
