#!/usr/bin/env python3
"""The guest that drives vblk's vhost-vdpa and vfio-pci transports against real devices, built
with build_guest.py's builder and booted with vmrun.py's; one guest for tests/test_vdpa_guest.py
and tests/test_vfio_guest.py.

The guest is a Debian 13 kernel (6.12: it has VDPA, VDUSE, VHOST_VDPA, VFIO and 9p as modules;
Debian 12's 6.1 has no vDPA) and a small busybox initramfs holding only the kernel modules.  Its
/init (tests/vm/transport_init) loads the modules, mounts the HOST's root read-only over virtio-9p
and chroots into it, so python3, nbdkit, qemu-storage-daemon, libnbd and nbdcopy come from the
host, unchanged.  The checkout is a 9p share of its own, read-only, at GUEST_REPO in the chroot
(wherever it lives on the host: the chroot's /tmp, /run and /dev/shm are the guest's own tmpfs),
and a writable share (a host directory) carries the plan in and the results out; images are
QEMU -drive disks, so the host checks them itself after QEMU has exited.

The kernel: linux-image-amd64's dependency in the *trixie* Packages index of the host's Debian
mirror (on a Debian 12 host apt has no trixie source): the index is authenticated through the
suite's InRelease (gpgv, debian-archive-keyring), the .deb through the index's SHA256, downloaded
with urllib into tests/vm/.cache/transport/debs/ (git-ignored).  On Debian 13 and later the
host's own linux-image-amd64 dependency is ``apt-get download``ed instead (build_guest.py's).

Results in tests/vm/.cache/transport/: vmlinux, initramfs.cpio, guest.json.  Rebuilt when
missing or when the init script, the module list, busybox or FORMAT changed; the cached .deb is
reused offline (``--refresh`` looks the current one up again).

    python3 tests/vm/transport_guest.py [--force] [--refresh]     build, print guest.json
    python3 tests/vm/transport_guest.py --boot [N]                 build, boot N times, timings
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import build_guest  # noqa: E402  (tests/vm/build_guest.py: the builder)
import transport_checks  # noqa: E402  (what the guest runs, and the data model)
import vmrun  # noqa: E402  (tests/vm/vmrun.py: booting a guest)
from build_guest import BuildError, log  # noqa: E402

from vblk_plugin.qsd import QSD, host_debian  # noqa: E402  (on the path: vblk_tools put it)
from vblk_tools import needs  # noqa: E402

DEFAULT_CACHE = os.path.join(HERE, ".cache", "transport")
INIT_SCRIPT = os.path.join(HERE, "transport_init")
#: where the guest sees the checkout (transport_init mounts the 9p share "repo" there)
GUEST_REPO = "/tmp/repo"
CHECKS_SCRIPT = f"{GUEST_REPO}/tests/vm/transport_checks.py"
SUITE = "trixie"           # the Debian suite whose kernel has vDPA (Debian 12's 6.1 has none)
KERNEL_META = "linux-image-amd64"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
FORMAT = 4  # bump when the build changes in a way the cache key does not see

# Module groups the init can load (vblk.modules=9p,blk,vdpa); dependencies come first
# (modinfo), a module already loaded by an earlier group is skipped in the guest.
MODULE_GROUPS: dict[str, list[str]] = {
    "9p": ["netfs", "9pnet", "9p", "9pnet_virtio"],         # the host root and the share
    "blk": ["virtio_blk"],                                   # disks for qemu-storage-daemon
    # vDPA through VDUSE, bound to vhost_vdpa: virtio_vdpa is deliberately NOT in the guest
    # (it would claim the device for the guest kernel instead of /dev/vhost-vdpa-N).
    "vdpa": ["vdpa", "vhost_iotlb", "vduse", "irqbypass", "vhost", "vhost_vdpa"],
    "vfio": ["vfio", "vfio_iommu_type1", "vfio_pci"],
}
# Kernel options the guest needs (checked in the kernel package's boot/config-*).
REQUIRED_CONFIG = {
    "CONFIG_VDPA": "m", "CONFIG_VDPA_USER": "m", "CONFIG_VHOST_VDPA": "m",
    "CONFIG_VFIO_PCI": "m", "CONFIG_INTEL_IOMMU": "y", "CONFIG_IRQ_REMAP": "y",
    "CONFIG_NET_9P_VIRTIO": "m", "CONFIG_9P_FS": "m", "CONFIG_VIRTIO_BLK": "m",
    "CONFIG_PVH": "y",
}

# ----------------------------------------------------------------------------- host checks

#: what the guest needs of the host beyond the builder's: QEMU to boot it
HOST_NEEDS = {"qemu-system-x86_64": "qemu-system-x86"}
# Only for fetching the kernel from the archive (Debian 12 hosts): the index's signature.
ARCHIVE_NEEDS = {"gpgv": "gpgv", KEYRING: "debian-archive-keyring"}
#: what the guest runs from the host's root (through the 9p share), by package
GUEST_NEEDS = {"/usr/bin/python3": "python3", "nbdkit": "nbdkit", "nbdcopy": "libnbd-bin",
               QSD: needs.QSD_PACKAGE, "vdpa": "iproute2",
               "/usr/lib/python3/dist-packages/nbd.py": "python3-libnbd",
               "/usr/lib/*/nbdkit/plugins/nbdkit-python-plugin.so": "nbdkit-plugin-python"}
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tools() -> list[str]:
    """What booting and running the guest needs and is not there, with the package of each."""
    return (needs.missing({**build_guest.BUILD_NEEDS, **HOST_NEEDS})
            + needs.missing(GUEST_NEEDS, path=GUEST_PATH))


# ----------------------------------------------------------------------------- kernel package

def host_mirror() -> str:
    """The Debian mirror the host's apt uses (deb822 .sources or sources.list), not a security
    or ports archive; deb.debian.org if none is found."""
    candidates: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for stanza in f.read().split("\n\n"):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
                if "deb" not in fields.get("Types", "").split():
                    continue
                suites = fields.get("Suites", "").split()
                if any(s.endswith("-security") for s in suites):
                    continue
                candidates += fields.get("URIs", "").split()
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            with open(path) as f:
                for line in f:
                    m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                    if m and not m.group(2).endswith("-security"):
                        candidates.append(m.group(1))
        except OSError:
            pass
    for uri in candidates:
        if uri.startswith(("http://", "https://")) and "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def fetch(url: str, dest: str | None = None, what: str = "") -> bytes:
    """GET url; into dest (via dest.part, with progress) if given, else returned."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            if dest is None:
                return bytes(r.read())
            total = int(r.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            with open(dest + ".part", "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    pct = done * 100 // total if total else -1
                    if pct // 20 != shown // 20 and pct >= 0:
                        shown = pct
                        log(f"  {what or os.path.basename(dest)}: {done >> 20} of "
                            f"{total >> 20} MiB")
            os.rename(dest + ".part", dest)
            return b""
    except (urllib.error.URLError, OSError) as e:
        raise BuildError(f"cannot download {url}: {e}") from e


def verified_packages_index(mirror: str, suite: str, workdir: str) -> str:
    """The suite's main/binary-amd64 Packages text, authenticated: InRelease checked with gpgv
    against debian-archive-keyring, Packages.xz against InRelease's SHA256."""
    inrelease = os.path.join(workdir, "InRelease")
    with open(inrelease, "wb") as f:
        f.write(fetch(f"{mirror}/dists/{suite}/InRelease"))
    gpg = subprocess.run(["gpgv", "--keyring", KEYRING, inrelease], capture_output=True,
                         text=True)
    if gpg.returncode != 0:
        raise BuildError(f"gpgv could not verify {mirror}/dists/{suite}/InRelease "
                         f"({gpg.returncode}): {gpg.stderr.strip()} (package gpgv, "
                         "debian-archive-keyring up to date?)")
    with open(inrelease) as f:
        text = f.read()
    sha_section = text.split("\nSHA256:\n", 1)
    m = re.search(r"^ ([0-9a-f]{64})\s+(\d+) main/binary-amd64/Packages\.xz$",
                  sha_section[-1], re.M) if len(sha_section) == 2 else None
    if not m:
        raise BuildError(f"{suite}'s InRelease lists no SHA256 for main/binary-amd64/Packages.xz")
    log(f"InRelease of {suite} verified; fetching main/binary-amd64/Packages.xz "
        f"({int(m.group(2)) >> 20} MiB)")
    data = fetch(f"{mirror}/dists/{suite}/main/binary-amd64/Packages.xz")
    if hashlib.sha256(data).hexdigest() != m.group(1) or len(data) != int(m.group(2)):
        raise BuildError(f"{suite}'s Packages.xz does not match its InRelease (mirror in sync?)")
    return lzma.decompress(data).decode("utf-8", "replace")


def package_stanza(index: str, name: str) -> dict[str, str]:
    m = re.search(rf"^Package: {re.escape(name)}\n(.*?)(?:\n\n|\Z)", index, re.M | re.S)
    if not m:
        raise BuildError(f"package {name} is not in the {SUITE} Packages index")
    return dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", m.group(0), re.M))


def archive_kernel_deb(debdir: str, refresh: bool) -> str:
    """The trixie kernel .deb (linux-image-amd64's dependency) from the host's mirror."""
    have = sorted(glob.glob(os.path.join(debdir, "linux-image-*.deb")))
    if have and not refresh:
        log(f"kernel package (cached): {os.path.basename(have[-1])}")
        return have[-1]
    missing = needs.missing(ARCHIVE_NEEDS)
    if missing:
        raise BuildError(needs.explain(f"fetching the {SUITE} kernel", missing,
                                       "scripts/setup --vm"))
    mirror = host_mirror()
    log(f"looking up {KERNEL_META} in {mirror} {SUITE}")
    work = tempfile.mkdtemp(prefix="index-", dir=debdir)
    try:
        index = verified_packages_index(mirror, SUITE, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    depends = package_stanza(index, KERNEL_META).get("Depends", "")
    names = re.findall(r"(linux-image-[0-9][^\s,()|]*)", depends)
    if not names:
        raise BuildError(f"{SUITE}'s {KERNEL_META} depends on no versioned kernel: {depends!r}")
    pkg = package_stanza(index, names[0])
    filename, sha, size = pkg.get("Filename"), pkg.get("SHA256"), int(pkg.get("Size", "0"))
    if not filename or not sha:
        raise BuildError(f"the {SUITE} index has no Filename/SHA256 for {names[0]}")
    dest = os.path.join(debdir, os.path.basename(filename))
    if not (os.path.exists(dest) and build_guest.sha256_file(dest) == sha):
        log(f"downloading {names[0]} {pkg.get('Version')} ({size >> 20} MiB) from {mirror}")
        fetch(f"{mirror}/{filename}", dest, names[0])
        got = build_guest.sha256_file(dest)
        if got != sha:
            os.unlink(dest)
            raise BuildError(f"{filename}: SHA256 {got} is not the index's {sha}")
    for old in glob.glob(os.path.join(debdir, "linux-image-*.deb")):
        if old != dest:
            os.unlink(old)   # an older point release: superseded
    log(f"kernel package: {os.path.basename(dest)} ({os.path.getsize(dest) >> 20} MiB, "
        "SHA256 verified)")
    return dest


def kernel_deb(cache: str, refresh: bool = False) -> str:
    debdir = os.path.join(cache, "debs")
    os.makedirs(debdir, exist_ok=True)
    if (host_debian() or 13) <= 12:
        return archive_kernel_deb(debdir, refresh)
    # Debian 13 and later: the host's own kernel package has vDPA (checked after unpacking); the
    # default cache shares the .deb with build_guest.py's guest (tests/vm/.cache/debs).
    return str(build_guest.kernel_deb(build_guest.DEFAULT_CACHE if cache == DEFAULT_CACHE
                                      else cache))


def check_kernel_config(config_path: str) -> None:
    with open(config_path) as f:
        config = dict(re.findall(r"^(CONFIG_\w+)=(\S+)$", f.read(), re.M))
    bad = [f"{k}={config.get(k, 'unset')} (need {v})" for k, v in REQUIRED_CONFIG.items()
           if config.get(k) not in (v, "y")]
    if bad:
        raise BuildError(f"the guest kernel {os.path.basename(config_path)} lacks: "
                         f"{', '.join(bad)}")


# ----------------------------------------------------------------------------- building

def input_key(deb: str) -> str:
    h = hashlib.sha256()
    h.update(f"format {FORMAT}\n{os.path.basename(deb)}\n".encode())
    h.update(json.dumps(MODULE_GROUPS, sort_keys=True).encode())
    with open(INIT_SCRIPT, "rb") as f:
        h.update(f.read())
    h.update(build_guest.sha256_file(build_guest.BUSYBOX).encode())
    return h.hexdigest()


def populate_root(root: str, moddir: str, kver: str) -> dict:
    """busybox with its applet links, the modules of every group (decompressed, flat),
    /etc/vblk-modules/GROUP (load order), /etc/vblk-kver and /init."""
    build_guest.busybox_root(root, ["etc/vblk-modules", "host", f"lib/modules/{kver}"])
    groups: dict[str, list[str]] = {}
    copied: set[str] = set()
    for group, wanted in MODULE_GROUPS.items():
        names = []
        for src in build_guest.resolve_modules(moddir, wanted):
            name = build_guest.module_name(src)
            if name not in copied:
                build_guest.copy_module(src, os.path.join(root, f"lib/modules/{kver}/{name}.ko"))
                copied.add(name)
            names.append(name)
        with open(os.path.join(root, "etc/vblk-modules", group), "w") as f:
            f.write("".join(f"{n}\n" for n in names))
        groups[group] = names
        log(f"module group {group}: {' '.join(names)}")
    with open(os.path.join(root, "etc/vblk-kver"), "w") as f:
        f.write(kver + "\n")
    build_guest.copy_into(root, INIT_SCRIPT, "init", 0o755)
    return {"module_groups": groups}


def ensure_guest(cache: str = DEFAULT_CACHE, force: bool = False,
                 refresh: bool = False) -> dict:
    """The guest's description (paths in the cache), building whatever is missing.  Raises
    BuildError saying what is missing and which package provides it."""
    missing = needs.missing(build_guest.BUILD_NEEDS)
    if missing:
        raise BuildError(needs.explain("the transport guest", missing, "scripts/setup --vm"))
    with build_guest.locked(cache):
        deb = kernel_deb(cache, refresh)
        return build_guest.build(cache, input_key(deb), lambda: deb, populate_root,
                                 check=check_kernel_config, force=force)


# ----------------------------------------------------------------------------- running QEMU

@dataclasses.dataclass
class Disk:
    """A raw image as a virtio-blk-pci disk at PCI slot ``slot`` of bus 0."""
    path: str
    slot: int
    serial: str
    num_queues: int = 1
    iommu_platform: bool = False   # behind the vIOMMU (needed for vfio-pci)

    @property
    def pci_address(self) -> str:
        return f"0000:00:{self.slot:02x}.0"


SHARE_SLOT, ROOT_SLOT, REPO_SLOT = 2, 3, 6     # (the tests put their disks at 4 and 5)


def qemu_command(meta: dict, share: str, *, modules: list[str], run: str = "",
                 disks: Sequence[Disk] = (), iommu: bool = False, memory_mb: int = 1024,
                 smp: int = 1, append: Sequence[str] = ()) -> list[str]:
    """QEMU (TCG) booting the guest: host root read-only at 9p tag hostroot, the checkout
    read-only at tag repo, ``share`` writable at tag share, the disks, and with ``iommu`` a q35
    machine with an intel-iommu (interrupt remapping, caching mode: what vfio in the guest
    needs) placed before every PCI device.  ``run`` is a path in the guest (GUEST_REPO/...).
    Raises ValueError for a ``run`` the kernel command line cannot carry."""
    if re.search(r"\s", run):
        raise ValueError(f"path with white space cannot go on the kernel command line: {run!r}")
    # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail
    # ("IO-APIC + timer doesn't work!", a panic at 0.05 s): seen once in a few dozen boots.
    # cryptomgr.notests: the crypto self-tests cost ~1 s of the ~4 s to /init under TCG
    # (6 boots each, medians 4.2 s vs 3.1 s); nothing here relies on kernel crypto.
    cmdline = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4", "rdinit=/init",
               "no_timer_check", "cryptomgr.notests",
               "i8042.noaux=1", "i8042.nokbd=1", "i8042.nopnp=1",
               f"vblk.modules={','.join(modules)}"]
    if run:
        cmdline.append(f"vblk.run={run}")
    if iommu:
        cmdline.append("intel_iommu=on")
    cmdline += list(append)
    opt = vmrun.qemu_opt
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", str(smp),
           "-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none",
           "-machine", "q35" if iommu else "pc",
           "-kernel", opt(meta["vmlinux"]), "-initrd", opt(meta["initramfs"]),
           "-append", " ".join(cmdline)]
    if iommu:
        cmd += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    for tag, path, slot, mode in (("hostroot", "/", ROOT_SLOT, ",readonly=on"),
                                  ("repo", build_guest.REPO, REPO_SLOT, ",readonly=on"),
                                  ("share", share, SHARE_SLOT, "")):
        cmd += ["-fsdev", f"local,id=fs{tag},path={opt(path)},security_model=none{mode},"
                          "multidevs=remap",
                "-device", f"virtio-9p-pci,fsdev=fs{tag},mount_tag={tag},addr={slot:#x}"]
    for i, d in enumerate(disks):
        cmd += ["-drive", f"file={opt(d.path)},if=none,id=d{i},format=raw,discard=unmap",
                "-device", f"virtio-blk-pci,drive=d{i},serial={d.serial},addr={d.slot:#x},"
                           f"num-queues={d.num_queues},disable-legacy=on"
                           + (",iommu_platform=on" if d.iommu_platform else "")]
    return cmd


def run_guest(meta: dict, share: str, *, modules: list[str], run: str = "",
              disks: Sequence[Disk] = (), iommu: bool = False, timeout: float = 150.0,
              smp: int = 1, memory_mb: int = 1024,
              progress: Callable[[str], None] | None = None) -> vmrun.GuestRun:
    """Boot the guest once and wait for it to power off (vmrun.boot: QEMU is killed by PID on
    timeout); every console line goes to ``progress`` as it arrives."""
    cmd = qemu_command(meta, share, modules=modules, run=run, disks=disks, iommu=iommu,
                       smp=smp, memory_mb=memory_mb)
    return vmrun.boot(cmd, timeout=timeout, progress=progress)


# ----------------------------------------------------------------------------- scenarios

@dataclasses.dataclass
class ScenarioRun:
    run: vmrun.GuestRun
    results: dict         # the guest's results.json ({} if it wrote none)
    share: str            # the writable share: plan.json, results.json, bench.md, out.img, logs/

    def explain(self) -> str:
        logs = []
        for path in sorted(glob.glob(os.path.join(self.share, "logs", "*.log"))):
            with open(path, errors="replace") as f:
                tail = "\n".join(f.read().splitlines()[-20:])
            logs.append(f"--- guest {os.path.basename(path)} ---\n{tail}")
        err = self.results.get("error")
        return "\n".join([self.run.explain(), *logs, f"guest error: {err}" if err else ""])


def run_scenario(workdir: str, plan: dict, *, disks: Sequence[Disk], modules: list[str],
                 iommu: bool = False, timeout: float = 180.0, smp: int = 1,
                 progress: Callable[[str], None] | None = None) -> ScenarioRun:
    """Write the plan (and the file nbdcopy copies in) to a fresh share under workdir, boot the
    guest on transport_checks.py, return what it reported."""
    share = os.path.join(workdir, "share")
    os.makedirs(share, exist_ok=True)
    with open(os.path.join(share, "plan.json"), "w") as f:
        json.dump(plan, f)
    with open(os.path.join(share, "src.bin"), "wb") as f:
        f.write(transport_checks.source_file_data(plan["seed"]))
    meta = ensure_guest()
    run = run_guest(meta, share, modules=modules, run=CHECKS_SCRIPT, disks=disks, iommu=iommu,
                    timeout=timeout, smp=smp, progress=progress)
    try:
        with open(os.path.join(share, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    return ScenarioRun(run, results, share)


def host_checks(workdir: str, image: str, sr: ScenarioRun, seed: str, queues: int) -> list[str]:
    """With QEMU gone: the image and nbdcopy's copy of the export (share/out.img) against
    transport_checks' model, byte for byte; holes where trims and zeroes deallocated (if the
    host file system makes holes); the stats file's queues.  Returns the problems found."""
    res = sr.results
    problems = []
    t = time.monotonic()
    for what, path in (("the image", image),
                       ("nbdcopy's copy of the export", os.path.join(sr.share, "out.img"))):
        if not os.path.exists(path):
            problems.append(f"{what} ({path}) is missing")
            continue
        diff = transport_checks.verify_image(path, seed, res.get("fast_zero_done", False))
        if diff:
            problems.append(f"{what} differs from what the clients wrote: {diff}")
    holes = transport_checks.hole_report(image)
    makes_holes = transport_checks.filesystem_makes_holes(workdir)
    print(f"host: byte-for-byte checks in {time.monotonic() - t:.1f}s; ranges deallocated in the "
          f"host file: {holes} (its file system makes holes: {makes_holes})")
    if makes_holes:
        for kind in ("trim", "zero"):
            if not holes[kind]:
                problems.append(f"the {kind} range is still allocated in the host file: the "
                                "request did not reach it as a deallocation")
        if holes["zero_nohole"]:
            problems.append("the NO_HOLE zero range was deallocated in the host file")
    stats = res.get("stats", {})
    used = [q["index"] for q in stats.get("queues", []) if q["requests"] > 0]
    if len(stats.get("queues", [])) != queues or len(used) < 2:
        problems.append(f"stats: {len(stats.get('queues', []))} queues, used {used}")
    return problems


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    ap.add_argument("--refresh", action="store_true",
                    help="look the current kernel package up again (network)")
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--boot", type=int, nargs="?", const=1, default=0, metavar="N",
                    help="boot N times (init loads every module group, mounts, powers off)")
    ap.add_argument("--iommu", action="store_true", help="with --boot: q35 + intel-iommu")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true", help="with --boot: the console")
    args = ap.parse_args()
    try:
        meta = ensure_guest(args.cache, args.force, args.refresh)
    except BuildError as e:
        print(f"transport_guest: {e}", file=sys.stderr)
        return 1
    if not args.boot:
        print(json.dumps(meta, indent=1))
        return 0
    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    share = tempfile.mkdtemp(prefix="vblk-tg-")
    try:
        for i in range(args.boot):
            r = run_guest(meta, share, modules=list(MODULE_GROUPS), iommu=args.iommu,
                          smp=args.smp, timeout=120,
                          progress=echo if args.verbose else None)
            print(f"boot {i + 1}: init after {r.boot_seconds}s, powered off after "
                  f"{r.seconds:.1f}s: {r.result_line}", flush=True)
            if not r.ok:
                print(r.explain(), file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(share, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
