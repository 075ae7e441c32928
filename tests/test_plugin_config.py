"""Unit tests of vblk_plugin.config (no nbdkit): every key of PluginConfig, every check in
complete() and check_device(), and a fuzz: any key/value strings are either accepted or
refused with a ConfigError carrying a message, never another exception."""
from __future__ import annotations

import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vblk_core.errors import ConfigError, VblkError
from vblk_plugin.config import KEYS, MAX_QUEUES, PluginConfig, check_device


@pytest.fixture
def unix_socket(sockdir):
    """A bound unix socket file (in conftest's short private directory)."""
    path = os.path.join(sockdir, "s.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    yield path
    s.close()


def cfg_with(**kv) -> PluginConfig:
    c = PluginConfig()
    for k, v in kv.items():
        c.set(k.replace("_", "-"), v)
    return c


def refused(key, value, *, match=None) -> str:
    c = PluginConfig()
    with pytest.raises(ConfigError) as ei:
        c.set(key, value)
    msg = str(ei.value)
    assert msg
    if match is not None:
        assert match in msg, msg
    return msg


# --- defaults and accepted values --------------------------------------------------------------

def test_defaults():
    c = PluginConfig()
    assert (c.socket, c.image, c.format, c.aio) == (None, None, "raw", "threads")
    assert c.num_queues is None
    assert c.queue_size == 256
    assert c.bounce_buffers == 64
    assert c.stats is None
    assert c.reconnect_timeout == 30.0 and c.request_timeout == 30.0


def test_keys_documented():
    assert set(KEYS) == {"socket", "image", "vdpa", "pci", "format", "aio", "num-queues",
                         "queue-size",
                         "bounce-buffers", "stats", "reconnect-timeout", "request-timeout",
                         "placement", "spin"}
    assert all(KEYS[k].strip() for k in KEYS)


def test_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cfg_with(socket="a.sock", stats="st.json")
    assert c.socket == str(tmp_path / "a.sock")
    assert c.stats == str(tmp_path / "st.json")
    c = cfg_with(image="sub/../disk.img")
    assert c.image == str(tmp_path / "disk.img")


@pytest.mark.parametrize("value,expected", [("1", 1), ("4", 4), (str(MAX_QUEUES), MAX_QUEUES),
                                            ("0x10", 16)])
def test_num_queues_accepted(value, expected):
    assert cfg_with(num_queues=value).num_queues == expected


@pytest.mark.parametrize("value", ["4", "8", "128", "256", "32768"])
def test_queue_size_accepted(value):
    assert cfg_with(queue_size=value).queue_size == int(value)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_format_accepted(fmt):
    assert cfg_with(format=fmt).format == fmt


@pytest.mark.parametrize("aio", ["threads", "io_uring", "native"])
def test_aio_accepted(aio):
    assert cfg_with(aio=aio).aio == aio


def test_timeouts_and_bounce_buffers_accepted():
    c = cfg_with(reconnect_timeout="0", request_timeout="0.5", bounce_buffers="4")
    assert c.reconnect_timeout == 0 and c.request_timeout == 0.5 and c.bounce_buffers == 4
    c = cfg_with(reconnect_timeout="86400", request_timeout="86400", bounce_buffers="4096")
    assert c.reconnect_timeout == 86400 and c.request_timeout == 86400
    assert c.bounce_buffers == 4096


# --- refused values ------------------------------------------------------------------------------

@pytest.mark.parametrize("value,match", [
    # The driver's rule (vblk_core.virtio_blk.queue_size_problem): a request needs 3
    # descriptors, so rings below 4 are refused, and the ring size is a power of two.
    ("0", "queue-size=0 is not a usable ring size: use a power of two from 4 to 32768"),
    ("1", "queue-size=1 is not a usable ring size"),
    ("2", "queue-size=2 is not a usable ring size"),
    ("3", "queue-size=3 is not a usable ring size"),
    ("6", "queue-size=6 is not a usable ring size: use a power of two"),
    ("1000", "queue-size=1000 is not a usable ring size"),
    ("65536", "queue-size=65536 is not a usable ring size"),
    ("abc", "queue-size='abc' is not a whole number"),
    ("", "queue-size='' is not a whole number"),
    ("-4", "queue-size=-4 is not a usable ring size"),
    ("1.5", "queue-size='1.5' is not a whole number"),
])
def test_queue_size_refused(value, match):
    refused("queue-size", value, match=match)


@pytest.mark.parametrize("value,match", [
    ("0", "num-queues=0 is out of range"),
    (str(MAX_QUEUES + 1), f"num-queues={MAX_QUEUES + 1} is out of range"),
    ("four", "num-queues='four' is not a whole number"),
])
def test_num_queues_refused(value, match):
    refused("num-queues", value, match=match)


@pytest.mark.parametrize("value", ["3", "4097", "x"])
def test_bounce_buffers_refused(value):
    refused("bounce-buffers", value, match="bounce-buffers")


@pytest.mark.parametrize("key,value", [
    ("request-timeout", "0"), ("request-timeout", "-1"), ("request-timeout", "nan"),
    ("request-timeout", "inf"), ("request-timeout", "soon"), ("reconnect-timeout", "-0.5"),
    ("reconnect-timeout", "86401"), ("reconnect-timeout", "NaN"), ("reconnect-timeout", ""),
])
def test_timeouts_refused(key, value):
    refused(key, value, match=key)


@pytest.mark.parametrize("key,value", [("format", "vmdk"), ("format", "RAW"),
                                       ("aio", "posix"), ("aio", "")])
def test_format_and_aio_refused(key, value):
    msg = refused(key, value, match=key)
    assert "use one of" in msg


@pytest.mark.parametrize("key", ["socket", "image", "stats"])
def test_empty_path_refused(key):
    refused(key, "", match=f"{key}= needs a path")


def test_unknown_key():
    msg = refused("bogus", "1", match="unknown parameter 'bogus'")
    for k in KEYS:
        assert k in msg


def test_key_twice():
    c = cfg_with(queue_size="128")
    with pytest.raises(ConfigError, match="queue-size= given twice"):
        c.set("queue-size", "128")


def test_config_error_is_vblk_error_with_einval():
    import errno
    with pytest.raises(VblkError) as ei:
        PluginConfig().set("queue-size", "3")
    assert ei.value.errno == errno.EINVAL


# --- complete() ----------------------------------------------------------------------------------

def test_complete_no_device():
    with pytest.raises(ConfigError, match="no device: give socket=PATH"):
        PluginConfig().complete()


def test_complete_both_devices(unix_socket, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    c = cfg_with(socket=unix_socket, image=str(img))
    with pytest.raises(ConfigError, match="socket= and image= were both given"):
        c.complete()


def test_complete_socket_ok(unix_socket, tmp_path):
    c = cfg_with(socket=unix_socket, num_queues="2", stats=str(tmp_path / "s.json"))
    c.complete()
    assert c.socket == unix_socket


def test_complete_socket_missing(tmp_path):
    c = cfg_with(socket=str(tmp_path / "nope.sock"))
    with pytest.raises(ConfigError, match=r"socket=.*nope\.sock does not exist"):
        c.complete()


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_complete_socket_not_a_socket(tmp_path, kind):
    p = tmp_path / "notsock"
    if kind == "file":
        p.write_text("x")
    else:
        p.mkdir()
    c = cfg_with(socket=str(p))
    with pytest.raises(ConfigError, match="is not a unix socket"):
        c.complete()


@pytest.mark.parametrize("key,value", [("format", "raw"), ("aio", "threads")])
def test_complete_image_only_keys_with_socket(unix_socket, key, value):
    c = cfg_with(socket=unix_socket)
    c.set(key, value)
    with pytest.raises(ConfigError, match=f"{key}= only applies with image="):
        c.complete()


def test_complete_image_ok(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    c = cfg_with(image=str(img), format="raw", aio="io_uring", num_queues="2")
    c.complete()
    assert c.image == str(img)


def test_complete_image_missing(tmp_path):
    c = cfg_with(image=str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match=r"image=.*missing\.img does not exist"):
        c.complete()


def test_complete_image_empty(tmp_path):
    img = tmp_path / "empty.img"
    img.write_bytes(b"")
    c = cfg_with(image=str(img))
    with pytest.raises(ConfigError, match=r"image=.*empty\.img is empty"):
        c.complete()


def test_complete_image_directory(tmp_path):
    c = cfg_with(image=str(tmp_path))
    with pytest.raises(ConfigError, match="is not a regular file or block device"):
        c.complete()


def test_complete_stats_directory_missing(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    c = cfg_with(image=str(img), stats=str(tmp_path / "no" / "such" / "s.json"))
    with pytest.raises(ConfigError, match="stats=.*directory .* does not exist"):
        c.complete()


# --- fuzz ----------------------------------------------------------------------------------------

KEY_STRATEGY = st.one_of(st.sampled_from(sorted(KEYS)), st.text(max_size=20))
VALUE_STRATEGY = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0x10", "0o7", "0b11", "1_000", " 8 ", "1e3", "-0", "inf", "nan", "\0",
                     "/", ".", "..", "/dev/null", "/tmp", "/nonexistent/x", "raw", "qcow2",
                     "io_uring", "9" * 5000]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEY_STRATEGY, VALUE_STRATEGY), max_size=6))
def test_fuzz_any_key_value_is_accepted_or_config_error(pairs):
    c = PluginConfig()
    for key, value in pairs:
        try:
            c.set(key, value)
        except ConfigError as e:
            assert str(e).strip(), (key, value)
            # The message names the key the user gave (or says the key is unknown).
            assert key in str(e) or "unknown parameter" in str(e), (key, value, str(e))
        else:
            assert key in KEYS, f"unknown key {key!r} was accepted"
    try:
        c.complete()
    except ConfigError as e:
        assert str(e).strip()
    else:
        devices = [c.socket, c.image, c.vdpa, c.pci]
        assert sum(map(bool, devices)) == 1, "complete() accepted no device, or several"


@pytest.mark.parametrize("key", ["socket", "image", "stats"])
def test_path_with_nul_refused(key):
    # A NUL cannot reach the OS: it must be a ConfigError, not os.stat's ValueError later.
    refused(key, "/tmp/a\0b", match=key)


# --- check_device (what a socket= back-end offers; probed in config_complete) ------------------

class _Offer:
    def __init__(self, max_queues: int) -> None:
        self.max_queues = max_queues


def test_check_device_queue_count(unix_socket):
    c = cfg_with(socket=unix_socket, num_queues="4")
    check_device(c, _Offer(4))
    check_device(c, _Offer(8))
    with pytest.raises(ConfigError) as ei:
        check_device(c, _Offer(2))
    msg = str(ei.value)
    assert msg.startswith(f"num-queues=4 is more than the 2 the device at socket={unix_socket} "
                          "offers: use num-queues=2 or fewer"), msg
    assert "\n" not in msg


def test_check_device_default_queue_count_always_fits(unix_socket):
    check_device(cfg_with(socket=unix_socket), _Offer(1))
