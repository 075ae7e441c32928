"""BlockConfig.parse: virtio-blk config space, validated against the negotiated features."""
from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_blk import CONFIG_LEN, QSD_FEATURES, blk_config, qsd_like_config
from vblk_core.errors import DeviceError
from vblk_core.virtio_blk import CONFIG_SIZE, MAX_CAPACITY_SECTORS, BlockConfig, status_to_errno

# Feature bit numbers from the virtio 1.x spec (5.2.3), written here rather than imported so
# that the tests do not share the driver's definitions.
VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE = 1, 2, 6
VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_CONFIG_WCE = 9, 10, 11
VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES = 12, 13, 14


def bit(*bits: int) -> int:
    return sum(1 << b for b in bits)


ALL = bit(VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
          VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD,
          VIRTIO_BLK_F_WRITE_ZEROES)


def full(**over) -> bytes:
    """A config with every field meaningful."""
    fields = dict(capacity=1 << 21, size_max=1 << 16, seg_max=126, blk_size=4096,
                  physical_block_exp=0, min_io_size=1, opt_io_size=32, writeback=1,
                  num_queues=8, max_discard_sectors=32768, max_discard_seg=1,
                  discard_sector_alignment=8, max_write_zeroes_sectors=65536,
                  max_write_zeroes_seg=1, write_zeroes_may_unmap=1)
    fields.update(over)
    return blk_config(**fields)


def test_config_size_matches_the_spec():
    assert CONFIG_SIZE == CONFIG_LEN == 60


def test_qsd_config():
    cfg = BlockConfig.parse(qsd_like_config(64 << 20, 4), QSD_FEATURES)
    assert cfg.capacity == 64 << 20
    assert cfg.block_size == 512
    assert cfg.size_max == 0 and cfg.seg_max == 126
    assert cfg.num_queues == 4
    assert (cfg.max_discard_sectors, cfg.max_discard_seg) == (32768, 1)
    assert (cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg) == (32768, 1)
    assert cfg.write_zeroes_may_unmap is False
    assert cfg.writeback is False  # CONFIG_WCE offered and writeback 0


def test_all_fields_with_all_features():
    cfg = BlockConfig.parse(full(), ALL)
    assert cfg.capacity == (1 << 21) * 512          # capacity is always in 512-byte sectors
    assert cfg.block_size == 4096
    assert cfg.size_max == 1 << 16 and cfg.seg_max == 126
    assert cfg.min_io_size == 4096 and cfg.opt_io_size == 32 * 4096
    assert cfg.writeback is True and cfg.num_queues == 8
    assert cfg.discard_sector_alignment == 8
    assert cfg.max_write_zeroes_sectors == 65536 and cfg.write_zeroes_may_unmap is True


def test_fields_ignored_without_their_features():
    cfg = BlockConfig.parse(full(), 0)
    assert cfg.capacity == (1 << 21) * 512
    assert cfg.block_size == 512           # no BLK_SIZE: 512 whatever the field says
    assert cfg.size_max == 0               # no SIZE_MAX: no limit
    assert cfg.seg_max == 1                # no SEG_MAX: one segment
    assert cfg.num_queues == 1             # no MQ
    assert cfg.physical_block_exp == 0 and cfg.opt_io_size == 0
    assert cfg.max_discard_sectors == cfg.max_discard_seg == cfg.discard_sector_alignment == 0
    assert cfg.max_write_zeroes_sectors == cfg.max_write_zeroes_seg == 0
    assert cfg.write_zeroes_may_unmap is False
    assert cfg.writeback is False          # no FLUSH: write-through
    assert BlockConfig.parse(full(), bit(VIRTIO_BLK_F_FLUSH)).writeback is True
    assert BlockConfig.parse(full(writeback=0), bit(VIRTIO_BLK_F_FLUSH)).writeback is True
    assert BlockConfig.parse(full(writeback=0),
                             bit(VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE)).writeback is False


def test_invalid_fields_do_not_matter_without_their_features():
    # garbage in fields whose feature was not negotiated is not an error
    data = full(blk_size=12345, seg_max=0, num_queues=0, max_discard_sectors=0,
                max_write_zeroes_seg=0, size_max=7, physical_block_exp=200)
    assert BlockConfig.parse(data, 0).block_size == 512


@pytest.mark.parametrize("capacity", [0, MAX_CAPACITY_SECTORS + 1, (1 << 64) - 1])
def test_bad_capacity(capacity):
    with pytest.raises(DeviceError, match="capacity"):
        BlockConfig.parse(full(capacity=capacity), ALL)


def test_largest_capacity_accepted():
    cfg = BlockConfig.parse(full(capacity=MAX_CAPACITY_SECTORS, blk_size=512), ALL)
    assert cfg.capacity == 1 << 63


@pytest.mark.parametrize("blk_size", [0, 1, 256, 511, 513, 1000, 3000, 4095, 131072, 1 << 31])
def test_bad_block_size(blk_size):
    with pytest.raises(DeviceError, match="block size"):
        BlockConfig.parse(full(blk_size=blk_size), ALL)


@pytest.mark.parametrize("blk_size", [512, 1024, 4096, 65536])
def test_good_block_sizes(blk_size):
    assert BlockConfig.parse(full(blk_size=blk_size, capacity=1 << 20), ALL).block_size == blk_size


def test_capacity_not_a_multiple_of_block_size():
    with pytest.raises(DeviceError, match="multiple"):
        BlockConfig.parse(full(capacity=9, blk_size=4096), ALL)


def test_seg_max_zero():
    with pytest.raises(DeviceError, match="seg_max"):
        BlockConfig.parse(full(seg_max=0), ALL)


@pytest.mark.parametrize("size_max", [1, 512, 4095])
def test_size_max_too_small(size_max):
    with pytest.raises(DeviceError, match="size_max"):
        BlockConfig.parse(full(size_max=size_max), ALL)


def test_size_max_zero_means_no_limit():
    assert BlockConfig.parse(full(size_max=0), ALL).size_max == 0


def test_mq_with_zero_queues():
    with pytest.raises(DeviceError, match="num_queues"):
        BlockConfig.parse(full(num_queues=0), ALL)


def test_absurd_physical_block_exp():
    with pytest.raises(DeviceError, match="physical_block_exp"):
        BlockConfig.parse(full(physical_block_exp=17), ALL)


@pytest.mark.parametrize("field", ["max_discard_sectors", "max_discard_seg"])
def test_discard_with_zero_limits(field):
    with pytest.raises(DeviceError, match="DISCARD"):
        BlockConfig.parse(full(**{field: 0}), ALL)
    # fine without the feature
    BlockConfig.parse(full(**{field: 0}), ALL & ~bit(VIRTIO_BLK_F_DISCARD))


@pytest.mark.parametrize("field", ["max_write_zeroes_sectors", "max_write_zeroes_seg"])
def test_write_zeroes_with_zero_limits(field):
    with pytest.raises(DeviceError, match="WRITE_ZEROES"):
        BlockConfig.parse(full(**{field: 0}), ALL)
    BlockConfig.parse(full(**{field: 0}), ALL & ~bit(VIRTIO_BLK_F_WRITE_ZEROES))


@pytest.mark.parametrize("length", [0, 1, 7])
def test_too_short_for_capacity(length):
    with pytest.raises(DeviceError, match="at least 8"):
        BlockConfig.parse(full()[:length], 0)


def test_short_buffers_zero_fill_the_missing_fields():
    data = full()
    # 8 bytes: capacity only, fine with no features
    assert BlockConfig.parse(data[:8], 0).capacity == (1 << 21) * 512
    # cut before seg_max: with SEG_MAX that reads as 0, an error
    with pytest.raises(DeviceError, match="seg_max"):
        BlockConfig.parse(data[:12], bit(VIRTIO_BLK_F_SEG_MAX))
    # cut before blk_size: reads as 0
    with pytest.raises(DeviceError, match="block size"):
        BlockConfig.parse(data[:20], bit(VIRTIO_BLK_F_BLK_SIZE))
    # cut before the discard limits
    with pytest.raises(DeviceError, match="DISCARD"):
        BlockConfig.parse(data[:36], bit(VIRTIO_BLK_F_DISCARD))
    # longer than the struct: the tail is ignored
    assert BlockConfig.parse(data + b"\xff" * 40, ALL) == BlockConfig.parse(data, ALL)


def test_accepts_bytearray_and_memoryview():
    data = full()
    ref = BlockConfig.parse(data, ALL)
    assert BlockConfig.parse(bytearray(data), ALL) == ref
    assert BlockConfig.parse(memoryview(data), ALL) == ref


@pytest.mark.parametrize("status,err", [(0, 0), (1, errno.EIO), (2, errno.EOPNOTSUPP),
                                        (3, errno.EPROTO), (255, errno.EPROTO)])
def test_status_to_errno(status, err):
    assert status_to_errno(status) == err


# --- arbitrary input: a sane BlockConfig or a DeviceError, nothing else -------------------

def assert_sane(cfg: BlockConfig, features: int) -> None:
    def has(b):
        return bool(features >> b & 1)
    bs = cfg.block_size
    assert 512 <= bs <= 65536 and bs & (bs - 1) == 0
    assert 0 < cfg.capacity <= 1 << 63 and cfg.capacity % bs == 0 and cfg.capacity % 512 == 0
    assert cfg.seg_max >= 1
    assert cfg.size_max == 0 or cfg.size_max >= 4096
    assert cfg.num_queues >= 1
    assert 0 <= cfg.physical_block_exp <= 16
    assert cfg.min_io_size >= 0 and cfg.opt_io_size >= 0
    if has(VIRTIO_BLK_F_DISCARD):
        assert cfg.max_discard_sectors > 0 and cfg.max_discard_seg > 0
    else:
        assert cfg.max_discard_sectors == cfg.max_discard_seg == 0
    if has(VIRTIO_BLK_F_WRITE_ZEROES):
        assert cfg.max_write_zeroes_sectors > 0 and cfg.max_write_zeroes_seg > 0
    else:
        assert cfg.max_write_zeroes_sectors == cfg.max_write_zeroes_seg == 0
        assert not cfg.write_zeroes_may_unmap
    if not has(VIRTIO_BLK_F_MQ):
        assert cfg.num_queues == 1
    if not has(VIRTIO_BLK_F_BLK_SIZE):
        assert bs == 512
    assert isinstance(cfg.writeback, bool) and isinstance(cfg.write_zeroes_may_unmap, bool)


def _parse_or_device_error(data, features):
    try:
        cfg = BlockConfig.parse(data, features)
    except DeviceError:
        return None
    assert_sane(cfg, features)
    return cfg


@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=80),
       features=st.one_of(st.integers(min_value=0, max_value=(1 << 64) - 1),
                          st.sampled_from([0, ALL, QSD_FEATURES])))
def test_arbitrary_bytes(data, features):
    _parse_or_device_error(data, features)


@settings(max_examples=250, deadline=None, database=None)
@given(fields=st.fixed_dictionaries({
    "capacity": st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 24)),
    "size_max": st.sampled_from([0, 1, 4095, 4096, 1 << 20, (1 << 32) - 1]),
    "seg_max": st.integers(0, 300),
    "blk_size": st.one_of(st.sampled_from([0, 512, 1024, 4096, 65536, 131072]),
                          st.integers(0, (1 << 32) - 1)),
    "physical_block_exp": st.integers(0, 255),
    "min_io_size": st.integers(0, 0xFFFF),
    "opt_io_size": st.integers(0, (1 << 32) - 1),
    "writeback": st.integers(0, 255),
    "num_queues": st.integers(0, 0xFFFF),
    "max_discard_sectors": st.integers(0, 1 << 20),
    "max_discard_seg": st.integers(0, 4),
    "max_write_zeroes_sectors": st.integers(0, 1 << 20),
    "max_write_zeroes_seg": st.integers(0, 4),
    "write_zeroes_may_unmap": st.integers(0, 255),
}), features=st.integers(0, ALL))
def test_structured_configs(fields, features):
    """Plausible-looking configs: the valid ones must parse and carry the right values."""
    cfg = _parse_or_device_error(blk_config(**fields), features)
    has = lambda b: bool(features >> b & 1)  # noqa: E731
    bs = fields["blk_size"] if has(VIRTIO_BLK_F_BLK_SIZE) else 512
    valid = (0 < fields["capacity"] <= MAX_CAPACITY_SECTORS
             and 512 <= bs <= 65536 and bs & (bs - 1) == 0
             and fields["capacity"] * 512 % bs == 0
             and not (has(VIRTIO_BLK_F_SIZE_MAX) and 0 < fields["size_max"] < 4096)
             and not (has(VIRTIO_BLK_F_SEG_MAX) and fields["seg_max"] == 0)
             and not (has(VIRTIO_BLK_F_TOPOLOGY) and fields["physical_block_exp"] > 16)
             and not (has(VIRTIO_BLK_F_MQ) and fields["num_queues"] == 0)
             and not (has(VIRTIO_BLK_F_DISCARD) and not (fields["max_discard_sectors"]
                                                         and fields["max_discard_seg"]))
             and not (has(VIRTIO_BLK_F_WRITE_ZEROES) and not (
                 fields["max_write_zeroes_sectors"] and fields["max_write_zeroes_seg"])))
    assert (cfg is not None) == valid
    if cfg is not None:
        assert cfg.capacity == fields["capacity"] * 512
        assert cfg.block_size == bs
        if has(VIRTIO_BLK_F_MQ):
            assert cfg.num_queues == fields["num_queues"]
        if has(VIRTIO_BLK_F_SEG_MAX):
            assert cfg.seg_max == fields["seg_max"]
        if has(VIRTIO_BLK_F_SIZE_MAX):
            assert cfg.size_max == fields["size_max"]
