"""vblk_core.BlockDevice against a real qemu-storage-daemon, checked against the image file."""
from __future__ import annotations

import errno
import os
import random
import threading

import pytest

import vblk_core
from device_util import open_device
from vblk_core import ConfigError, ConnectError, RequestError
from vblk_tools.patterns import pattern

MiB = 1 << 20
SIZE = 64 * MiB


def image_bytes(qsd, offset, length):
    with open(qsd.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def requests(dev) -> int:
    return dev.stats()["totals"]["requests"]


# --- data ------------------------------------------------------------------------------------

def test_basic_properties(device, qsd):
    assert device.capacity == SIZE
    assert device.block_size == 512
    assert device.read_only is False
    assert device.num_queues == 4 and device.device_queues == 4
    assert device.can_flush and device.can_discard and device.can_write_zeroes
    assert device.state is vblk_core.DeviceState.CONNECTED


def test_get_id(device):
    assert device.get_id() == b"vhost_user_blk"


@pytest.mark.parametrize("offset,length", [
    (0, 512),
    (512, 4096),
    (3 * 4096 + 512, 12 * 512),
    (MiB - 512, 1536),                 # across a bounce-buffer-sized boundary
    (5 * MiB + 512, 3 * MiB + 512),    # several requests, unaligned to 4 KiB
    (SIZE - 4096, 4096),               # the last block
    (SIZE - 512, 512),
])
def test_write_matches_image_and_reads_back(device, qsd, offset, length):
    data = pattern(length, seed=offset)
    device.pwrite(data, offset)
    assert image_bytes(qsd, offset, length) == data
    # the neighbours are untouched (the image started sparse: zeroes)
    if offset:
        assert image_bytes(qsd, offset - 512, 512) == bytes(512)
    if offset + length < SIZE:
        assert image_bytes(qsd, offset + length, 512) == bytes(512)
    buf = bytearray(length)
    device.pread(buf, offset)
    assert buf == data
    # and a read that starts before and ends after the written range
    lo, hi = max(0, offset - 1024), min(SIZE, offset + length + 1024)
    wide = bytearray(hi - lo)
    device.pread(wide, lo)
    assert bytes(wide) == image_bytes(qsd, lo, hi - lo)


def test_read_prefilled_image(qsd_factory):
    content = pattern(3 * MiB + 4096, seed=42)
    qsd = qsd_factory(num_queues=2, content=content)
    with open_device(qsd.socket) as dev:
        buf = bytearray(len(content))
        dev.pread(buf, 0)
        assert buf == content
        small = bytearray(512)
        dev.pread(small, 2 * MiB + 512)
        assert small == content[2 * MiB + 512:2 * MiB + 1024]
        # reads into other writable buffer types
        arr = memoryview(bytearray(1024))
        dev.pread(arr, 512)
        assert arr.tobytes() == content[512:1536]


def test_write_accepts_buffer_types(device, qsd):
    device.pwrite(memoryview(b"\x11" * 1024), 0)
    device.pwrite(bytearray(b"\x22" * 512), 1024)
    import array
    device.pwrite(array.array("I", [0x33333333] * 128), 1536)
    assert image_bytes(qsd, 0, 2048) == b"\x11" * 1024 + b"\x22" * 512 + b"\x33" * 512


def test_zero_length_io(device):
    before = requests(device)
    device.pread(bytearray(0), 4096)
    device.pwrite(b"", 4096)
    device.write_zeroes(4096, 0)
    device.discard(4096, 0)
    assert requests(device) == before


def test_flush_and_fua(device, qsd):
    before = requests(device)
    device.flush()
    assert requests(device) == before + 1
    device.pwrite(b"\x77" * 4096, 8192, fua=True)
    assert requests(device) == before + 3   # the write and its flush
    assert image_bytes(qsd, 8192, 4096) == b"\x77" * 4096


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def _holes(path, start, end):
    """Ranges in [start, end) that the file system reports as holes."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                break
            if hole >= end:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as e:  # ENXIO: a hole up to EOF
                if e.errno != errno.ENXIO:
                    raise
                data = end
            out.append((hole, min(data, end)))
            pos = data
    finally:
        os.close(fd)
    return out


def test_discard_unmaps(device, qsd):
    base, length = 4 * MiB, 4 * MiB
    device.pwrite(pattern(length, 1), base)
    allocated = _allocated(qsd.image)
    assert allocated >= length
    assert _holes(qsd.image, base, base + length) == []
    before = requests(device)
    device.discard(base + MiB, 2 * MiB)
    assert requests(device) == before + 1
    buf = bytearray(length)
    device.pread(buf, base)
    assert buf[:MiB] == pattern(length, 1)[:MiB]
    assert buf[MiB:3 * MiB] == bytes(2 * MiB)
    assert buf[3 * MiB:] == pattern(length, 1)[3 * MiB:]
    assert image_bytes(qsd, base + MiB, 2 * MiB) == bytes(2 * MiB)
    assert _allocated(qsd.image) <= allocated - 2 * MiB
    assert (base + MiB, base + 3 * MiB) in _holes(qsd.image, base, base + length)


def test_discard_is_split_at_the_device_limit(device, qsd):
    # max_discard_sectors 32768 = 16 MiB per request
    assert device.config.max_discard_sectors == 32768
    device.pwrite(b"\x55" * (20 * MiB), 8 * MiB)
    before = requests(device)
    device.discard(8 * MiB, 20 * MiB)
    assert requests(device) == before + 2
    assert image_bytes(qsd, 8 * MiB, 20 * MiB) == bytes(20 * MiB)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(device, qsd, unmap):
    base = 10 * MiB
    device.pwrite(b"\xEE" * (2 * MiB), base)
    allocated = _allocated(qsd.image)
    device.write_zeroes(base + 512, MiB, unmap=unmap)
    buf = bytearray(2 * MiB)
    device.pread(buf, base)
    assert buf[:512] == b"\xEE" * 512
    assert buf[512:MiB + 512] == bytes(MiB)
    assert buf[MiB + 512:] == b"\xEE" * (MiB - 512)
    assert image_bytes(qsd, base, 2 * MiB) == bytes(buf)
    if unmap:
        # the daemon may deallocate (it punches a hole: all whole 4 KiB pages of the range)
        assert _allocated(qsd.image) <= allocated - (MiB - 4096)
        assert _holes(qsd.image, base, base + 2 * MiB) != []
    else:
        assert _allocated(qsd.image) >= allocated  # zeroes written, nothing deallocated
        assert _holes(qsd.image, base, base + 2 * MiB) == []


def test_write_zeroes_is_split_at_the_device_limit(device, qsd):
    assert device.config.max_write_zeroes_sectors == 32768
    device.pwrite(b"\x66" * (17 * MiB), 0)
    before = requests(device)
    device.write_zeroes(0, 17 * MiB)
    assert requests(device) == before + 2
    assert image_bytes(qsd, 0, 17 * MiB) == bytes(17 * MiB)


def test_32mib_transfer_is_split(device, qsd):
    data = random.Random(32).randbytes(32 * MiB)
    s0 = device.stats()["totals"]
    device.pwrite(data, 16 * MiB)
    s1 = device.stats()["totals"]
    n = -(-len(data) // device.max_transfer)
    assert n >= 32
    assert s1["requests"] - s0["requests"] == n
    assert s1["bytes"] - s0["bytes"] == len(data)
    assert image_bytes(qsd, 16 * MiB, 32 * MiB) == data
    buf = bytearray(32 * MiB)
    device.pread(buf, 16 * MiB)
    s2 = device.stats()["totals"]
    assert s2["requests"] - s1["requests"] == n
    assert s2["requests"] > 32 and s2["errors"] == 0
    assert buf == data
    assert s2["max_depth"] > 1  # several requests of one call were in flight at once


def test_concurrent_mixed_io(qsd, device):
    threads_n, region = 8, SIZE // 8
    errors: list[BaseException] = []
    models = [bytearray(region) for _ in range(threads_n)]
    start = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        rnd = random.Random(1000 + t)
        base, model = t * region, models[t]
        try:
            start.wait()
            for i in range(60):
                off = rnd.randrange(region // 512) * 512
                length = min(region - off, 512 * rnd.choice([1, 2, 8, 64, 300, 2100]))
                op = rnd.choices(["read", "write", "zero", "discard", "flush"],
                                 [35, 40, 10, 10, 5])[0]
                if op == "write":
                    data = rnd.randbytes(length)
                    device.pwrite(data, base + off)
                    model[off:off + length] = data
                elif op == "read":
                    buf = bytearray(length)
                    device.pread(buf, base + off)
                    assert buf == model[off:off + length], f"thread {t} op {i} read mismatch"
                elif op == "zero":
                    device.write_zeroes(base + off, length, unmap=rnd.random() < 0.5)
                    model[off:off + length] = bytes(length)
                elif op == "discard":
                    device.discard(base + off, length)
                    model[off:off + length] = bytes(length)  # discard=unmap: reads as zero
                else:
                    device.flush()
            buf = bytearray(region)
            device.pread(buf, base)
            assert buf == model, f"thread {t}: final read differs from the model"
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "I/O threads hung"
    if errors:
        raise errors[0]
    with open(qsd.image, "rb") as f:
        for t in range(threads_n):
            assert f.read(region) == models[t], f"image differs in thread {t}'s region"
    stats = device.stats()
    busy = [q for q in stats["queues"] if q["requests"] > 0]
    assert len(busy) > 1, stats
    assert stats["totals"]["errors"] == 0 and stats["totals"]["in_flight"] == 0


@pytest.mark.parametrize("queue_size", [4, 16, 1024])
def test_queue_sizes(qsd, queue_size):
    with open_device(qsd.socket, num_queues=1, queue_size=queue_size,
                               bounce_buffer_size=64 << 10, bounce_buffers=8) as dev:
        data = pattern(MiB, queue_size)
        dev.pwrite(data, MiB)
        buf = bytearray(MiB)
        dev.pread(buf, MiB)
        assert buf == data
        assert image_bytes(qsd, MiB, MiB) == data


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("offset,length", [(SIZE, 512), (SIZE - 512, 1024), (SIZE + 4096, 4096),
                                           (0, SIZE + 512)])
def test_past_the_end_is_eio(device, offset, length):
    before = requests(device)
    for op in (lambda: device.pread(bytearray(length), offset),
               lambda: device.pwrite(bytes(length), offset),
               lambda: device.write_zeroes(offset, length),
               lambda: device.discard(offset, length)):
        with pytest.raises(RequestError) as info:
            op()
        assert info.value.errno == errno.EIO
    assert requests(device) == before   # refused by the driver, not left to the device


@pytest.mark.parametrize("offset,length", [(1, 512), (511, 512), (4096, 100), (4096, 513),
                                           (-512, 512)])
def test_unaligned_or_negative_is_einval(device, qsd, offset, length):
    before = requests(device)
    for op in (lambda: device.pread(bytearray(length), offset),
               lambda: device.pwrite(b"\x01" * length, offset),
               lambda: device.write_zeroes(offset, length),
               lambda: device.discard(offset, length)):
        with pytest.raises(RequestError) as info:
            op()
        assert info.value.errno == errno.EINVAL
    assert requests(device) == before   # rejected before reaching the device
    assert image_bytes(qsd, 0, 8192) == bytes(8192)


def test_read_only_export(qsd_factory):
    content = pattern(MiB, 7)
    qsd = qsd_factory(num_queues=1, writable=False, content=content)
    with open_device(qsd.socket) as dev:
        assert dev.read_only is True
        assert not dev.can_discard and not dev.can_write_zeroes
        buf = bytearray(MiB)
        dev.pread(buf, 0)
        assert buf == content
        for op in (lambda: dev.pwrite(b"\x00" * 512, 0),
                   lambda: dev.write_zeroes(0, 512),
                   lambda: dev.discard(0, 512),
                   lambda: dev.pwrite(b"\x00" * 512, 0, fua=True)):
            with pytest.raises(RequestError) as info:
                op()
            assert info.value.errno == errno.EROFS
    assert image_bytes(qsd, 0, MiB) == content


def test_too_many_queues(qsd_factory):
    qsd = qsd_factory(num_queues=2)
    with pytest.raises(ConfigError, match="Too many queues requested"):
        open_device(qsd.socket, num_queues=3)
    with pytest.raises(ConfigError):
        open_device(qsd.socket, num_queues=0)
    # the daemon still serves the next front-end
    with open_device(qsd.socket, num_queues=2) as dev:
        assert dev.num_queues == 2
        dev.pwrite(b"\x42" * 512, 0)
    assert image_bytes(qsd, 0, 512) == b"\x42" * 512


def test_default_queue_count_is_capped(qsd_factory):
    qsd = qsd_factory(num_queues=6)
    with open_device(qsd.socket) as dev:
        assert dev.device_queues == 6 and dev.num_queues == 4
    qsd1 = qsd_factory(num_queues=1)
    with open_device(qsd1.socket) as dev:
        assert dev.num_queues == 1


@pytest.mark.parametrize("queue_size", [0, 1, 2, 3, 100, 65536, -4, 32769])
def test_bad_queue_size(qsd, queue_size):
    with pytest.raises(ConfigError, match="queue size"):
        open_device(qsd.socket, queue_size=queue_size)
    # the daemon was not left holding a half-open session
    with open_device(qsd.socket, queue_size=4, control_timeout=3) as dev:
        dev.flush()


def test_missing_socket(tmp_path):
    path = str(tmp_path / "nobody-here.sock")
    with pytest.raises(ConnectError, match="nobody-here.sock") as info:
        open_device(path)
    assert path in str(info.value)
    assert info.value.errno == errno.ENOENT


def test_dead_daemon_socket(qsd_factory):
    qsd = qsd_factory(num_queues=1)
    qsd.kill()
    assert os.path.exists(qsd.socket)   # a stale socket file, nobody listening
    with pytest.raises(ConnectError) as info:
        open_device(qsd.socket)
    assert qsd.socket in str(info.value)
    qsd.start()                          # restartable on the same socket and image
    with open_device(qsd.socket) as dev:
        dev.pwrite(b"\x01" * 512, 0)
    assert image_bytes(qsd, 0, 512) == b"\x01" * 512


def test_close_is_idempotent_and_io_after_close_fails(qsd):
    dev = open_device(qsd.socket)
    dev.pwrite(b"\x09" * 4096, 0)
    dev.close()
    dev.close()
    assert dev.state is vblk_core.DeviceState.CLOSED
    for op in (lambda: dev.pread(bytearray(4096), 0),
               lambda: dev.pwrite(b"\x00" * 4096, 0),
               dev.flush,
               lambda: dev.discard(0, 4096),
               lambda: dev.write_zeroes(0, 4096),
               dev.get_id):
        with pytest.raises(RequestError, match="closed") as info:
            op()
        assert info.value.errno == errno.EIO
    dev.close()
    assert image_bytes(qsd, 0, 4096) == b"\x09" * 4096
    # the daemon accepts the next front-end
    with open_device(qsd.socket) as dev2:
        buf = bytearray(4096)
        dev2.pread(buf, 0)
        assert buf == b"\x09" * 4096


def test_context_manager_closes(qsd):
    with open_device(qsd.socket) as dev:
        pass
    assert dev.state is vblk_core.DeviceState.CLOSED
    with pytest.raises(RequestError):
        dev.flush()


def test_no_thread_left_after_close(qsd):
    before = {t.ident for t in threading.enumerate()}
    dev = open_device(qsd.socket)
    dev.pwrite(b"\x01" * 4096, 0)
    assert any(t.name.startswith("vblk-") for t in threading.enumerate())
    dev.close()
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []
