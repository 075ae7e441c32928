"""The device keys vdpa= and pci= (beside socket= and image=): parsing, the checks made before
nbdkit listens, and the probe's error through a real nbdkit.  (The transports themselves are
driven for real in tests/test_vdpa_guest.py and tests/test_vfio_guest.py.)"""
from __future__ import annotations

import os

import pytest

from vblk_core.errors import ConfigError
from vblk_core.transports.vfio_pci import VfioPciConnector
from vblk_core.transports.vhost_vdpa import VhostVdpaConnector
from vblk_plugin.config import PluginConfig, connector, probe_device


def configured(**kv: str) -> PluginConfig:
    c = PluginConfig()
    for k, v in kv.items():
        c.set(k.replace("_", "-"), v)
    return c


@pytest.mark.parametrize("given, normal", [
    ("0000:00:04.0", "0000:00:04.0"), ("00:04.0", "0000:00:04.0"),
    ("0001:3A:1F.7", "0001:3a:1f.7"), ("10000:e1:00.0", "10000:e1:00.0"),   # a VMD domain
])
def test_pci_address_normalised(given, normal):
    assert configured(pci=given).pci == normal


@pytest.mark.parametrize("bad", ["", "04.0", "0000:00:04", "0000:00:20.0", "0000:00:04.8",
                                 "zz:00.0", "0000:00:04.0 "])
def test_pci_address_refused(bad):
    with pytest.raises(ConfigError, match="is not a PCI address.*lspci -D"):
        configured(pci=bad)


@pytest.mark.parametrize("given", ["00:04.0", "0001:3A:1F.7", "10000:e1:00.0", " 00:04.0",
                                   "0000:00:04.0\n", "000:00:04.0", "123456789:00:04.0"])
def test_pci_addresses_follow_one_rule(given):
    """pci= and the transport (what a library user gives VfioPciConnector) read an address
    the same way."""
    try:
        plugin: str | Exception = configured(pci=given).pci or ""
    except ConfigError as e:
        plugin = e
    try:
        driver: str | Exception = VfioPciConnector(given).address
    except ConfigError as e:
        driver = e
    if isinstance(plugin, str) or isinstance(driver, str):
        assert plugin == driver
    else:
        assert str(plugin).startswith(f"pci={given!r} is not a PCI address")
        assert str(driver).startswith(f"{given!r} is not a PCI address")


def test_pci_device_must_exist():
    c = configured(pci="00ff:ff:1f.7")
    with pytest.raises(ConfigError, match="pci=00ff:ff:1f.7: no such PCI device"):
        c.complete()


def test_vdpa_path_checks(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*vdpa dev show"):
        configured(vdpa=str(tmp_path / "vhost-vdpa-9")).complete()
    plain = tmp_path / "file"
    plain.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not a character device"):
        configured(vdpa=str(plain)).complete()
    configured(vdpa="/dev/null").complete()  # a character device: the probe judges it


@pytest.mark.parametrize("keys", [("vdpa", "pci"), ("socket", "vdpa"), ("image", "pci")])
def test_exactly_one_device(keys, tmp_path):
    values = {"vdpa": "/dev/null", "pci": "0000:00:00.0", "socket": str(tmp_path / "s"),
              "image": str(tmp_path / "i")}
    c = configured(**{k: values[k] for k in keys})
    with pytest.raises(ConfigError, match=f"{keys[0]}= and {keys[1]}= were both given"):
        c.complete()


@pytest.mark.parametrize("key", ["format", "aio"])
def test_image_only_keys_refused_with_vdpa(key):
    c = configured(vdpa="/dev/null", **{key: "raw" if key == "format" else "threads"})
    with pytest.raises(ConfigError, match=f"{key}= only applies with image=, not vdpa="):
        c.complete()


def test_connector_per_key():
    assert isinstance(connector(configured(vdpa="/dev/null")), VhostVdpaConnector)
    pci = connector(configured(pci="00:04.0"))
    assert isinstance(pci, VfioPciConnector) and "0000:00:04.0" in pci.target


def test_probe_of_something_that_is_not_vhost_vdpa():
    """/dev/null passes the path checks; the probe's first ioctl (VHOST_SET_OWNER) fails
    with ENOTTY, which must come back as one ConfigError naming the key and the fix."""
    c = configured(vdpa="/dev/null")
    c.complete()
    with pytest.raises(ConfigError, match="vdpa=/dev/null: .*not a vhost-vdpa device"):
        probe_device(c)


def test_nbdkit_refuses_a_non_vdpa_device_before_listening(nbdkit_factory):
    kit = nbdkit_factory(["vdpa=/dev/null"], "bad", start=False)
    status, output = kit.expect_exit().status, kit.log_text()
    assert status == 1, output
    assert "vdpa=/dev/null" in output and "not a vhost-vdpa device" in output
    assert "Traceback" not in output
    assert not os.path.exists(kit.socket), "nbdkit left its socket behind"
