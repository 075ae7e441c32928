#!/usr/bin/env python3
"""The one builder of the test guests (kernel, initramfs, cached), and the guest that tests the
kernel's NBD client (tests/test_kernel_client.py).

The builder (``build``): a kernel ``.deb`` is unpacked with ``dpkg-deb -x`` (never installed);
the uncompressed ``vmlinux`` is extracted once from the bzImage ``vmlinuz`` (xz on Debian 12,
zstd on 13) so that QEMU boots it directly through PVH, with no decompression under TCG; the
guest's ``populate(root, moddir, kver)`` fills a busybox root (``busybox_root``, kernel modules
with their dependencies, decompressed: ``resolve_modules``/``copy_module``) which becomes an
uncompressed newc initramfs (``make_cpio``, with ``busybox cpio``).  Results go to the guest's
cache directory (git-ignored, in the checkout: tests/vm/.cache/...): ``vmlinux``,
``initramfs.cpio`` and ``guest.json``, rebuilt when one is missing or the guest's input key
changed; one builder at a time per cache (a lock file).  transport_guest.py's guest is built
the same way.

The kernel-client guest comes from the running distribution's packages (Debian 12 and 13): the
kernel is the versioned package ``linux-image-amd64`` depends on (asked from ``apt-cache
depends``: the name changes with every point release), fetched with ``apt-get download`` into
``.cache/debs/``; the initramfs holds busybox-static's applets, nbd-client, mke2fs, the
libraries ``ldd`` lists plus the loader, the modules the guest needs (nbd, the virtio-net chain,
the ext4 chain) and ``tests/vm/init`` as ``/init``.  Its key: this script, the init script and
the versions of the host packages it copies.

Usage: python3 tests/vm/build_guest.py [--force] [--cache DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if os.path.join(REPO, "scripts") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "scripts"))   # run as a script: vblk_tools

from vblk_tools import needs  # noqa: E402

DEFAULT_CACHE = os.path.join(HERE, ".cache")
INIT_SCRIPT = os.path.join(HERE, "init")
BUSYBOX = "/bin/busybox"
#: what any guest build runs on the host, by package
BUILD_NEEDS = {BUSYBOX: "busybox-static", "dpkg-deb": "dpkg", "modinfo": "kmod",
               "zstd": "zstd"}     # zstd: Debian 13's kernel image is zstd-compressed

# Kernel modules to load, by name; their dependencies are added (first) automatically.
# crc32c_generic is a crypto soft dependency of ext4/jbd2 (modinfo does not list it as a dep).
WANTED_MODULES = ["nbd", "virtio_pci", "virtio_net", "crc32c_generic", "ext4"]
# Host programs copied into the initramfs (with their libraries), and where they go.
PROGRAMS = {"/usr/sbin/nbd-client": "sbin/nbd-client", "/usr/sbin/mke2fs": "sbin/mke2fs"}
#: what the kernel-client guest's build needs besides BUILD_NEEDS
CLIENT_NEEDS = {"/usr/sbin/nbd-client": "nbd-client", "/usr/sbin/mke2fs": "e2fsprogs",
                "ldd": "libc-bin", "apt-get": "apt", "apt-cache": "apt"}
# Host packages whose files end up in the initramfs: their versions are part of the cache key.
HOST_PACKAGES = ["busybox-static", "nbd-client", "e2fsprogs", "libc6"]
FORMAT = 5  # bump when the cache layout changes

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[build_guest {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class BuildError(RuntimeError):
    pass


def run(cmd, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} not found: install the packages (scripts/setup --vm)") from e
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()}") from e


def run_bytes(cmd, data: bytes) -> bytes:
    """Run cmd with data on stdin; its stdout."""
    try:
        r = subprocess.run(cmd, input=data, capture_output=True)
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} not found: install the packages (scripts/setup --vm)") from e
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({r.returncode}): "
                         f"{r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_version(pkg: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], text=True, capture_output=True)
    if r.returncode != 0 or not r.stdout:
        raise BuildError(f"Debian package {pkg} is not installed: run scripts/setup --vm")
    return r.stdout.strip()


# --------------------------------------------------------------------------- kernel package

KERNEL_META = "linux-image-amd64"


def kernel_package_name() -> str:
    """The versioned kernel image package that linux-image-amd64 depends on, for the running
    distribution (e.g. linux-image-6.1.0-41-amd64 on Debian 12, linux-image-6.12.57+deb13-amd64
    on Debian 13)."""
    for attempt in range(2):
        r = subprocess.run(["apt-cache", "depends", KERNEL_META], text=True, capture_output=True)
        names = re.findall(r"^\s*Depends:\s*(linux-image-[0-9][^\s<>]*)\s*$", r.stdout, re.M)
        if names:
            return names[0]
        if attempt == 0:
            log(f"apt-cache knows no {KERNEL_META} dependency: running apt-get update")
            run(["apt-get", "update", "-qq"])
    raise BuildError(f"cannot find the kernel image package that {KERNEL_META} depends on "
                     f"(apt-cache said: {r.stdout.strip() or r.stderr.strip()})")


def kernel_deb(cache: str) -> str:
    debdir = os.path.join(cache, "debs")
    os.makedirs(debdir, exist_ok=True)
    name = kernel_package_name()
    have = sorted(glob.glob(os.path.join(debdir, glob.escape(name) + "_*.deb")))
    if have:
        log(f"kernel package (cached): {os.path.basename(have[-1])}")
        return have[-1]
    log(f"downloading {name} with apt-get download (70 MB on Debian 12, 105 MB on Debian 13)")
    tmp = tempfile.mkdtemp(prefix="dl-", dir=debdir)
    try:
        # Sandbox user root: the download directory need not be readable by _apt.
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", name], cwd=tmp)
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {name} produced {debs}")
        dest = os.path.join(debdir, os.path.basename(debs[0]))
        os.rename(debs[0], dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in glob.glob(os.path.join(debdir, "linux-image-*.deb")):
        if old != dest:  # an older point release: superseded
            os.unlink(old)
    log(f"downloaded {os.path.basename(dest)} ({os.path.getsize(dest) >> 20} MiB)")
    return dest


XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def bzimage_payload(data: bytes, path: str) -> bytes:
    """The compressed kernel inside a bzImage: the boot protocol header (2.08+) gives its offset
    (0x248, from the start of the protected-mode code) and its length (0x24c)."""
    if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise BuildError(f"{path} is not a bzImage with boot protocol 2.08 or later")
    setup_sects = data[0x1f1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length < 8 or start + length > len(data):
        raise BuildError(f"{path}: payload offset {offset} / length {length} outside the file")
    return data[start:start + length]


def extract_vmlinux(vmlinuz: str, out: str) -> str:
    """Decompress the kernel inside the bzImage ``vmlinuz`` to ``out`` (the ELF vmlinux); returns
    the compression found.  xz (Debian 12) is decompressed with Python's lzma; zstd (Debian 13;
    Python 3.11-3.13 have no zstd module) with Debian's ``zstd`` tool.  The kernel build appends
    the uncompressed size as a 4-byte little-endian trailer to the payload: the zstd tool takes it
    for a broken frame ("unsupported format", exit 1), so it is cut off, and checked."""
    with open(vmlinuz, "rb") as f:
        data = f.read()
    payload = bzimage_payload(data, vmlinuz)
    size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if payload.startswith(XZ_MAGIC):
        kind = "xz"
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload[:-4])
        except lzma.LZMAError as e:
            raise BuildError(f"{vmlinuz}: xz payload: {e}") from e
    elif payload.startswith(ZSTD_MAGIC):
        kind = "zstd"
        elf = run_bytes(["zstd", "-q", "-d", "-c"], payload[:-4])
    else:
        raise BuildError(f"{vmlinuz}: kernel payload compressed with neither xz nor zstd "
                         f"(starts with {payload[:6].hex()})")
    if elf[:4] != b"\x7fELF" or len(elf) != size:
        raise BuildError(f"{vmlinuz}: the {kind} payload decompressed to {len(elf)} bytes "
                         f"starting with {elf[:4]!r}, expected an ELF file of {size} bytes")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(elf)
    os.rename(tmp, out)
    return kind


# --------------------------------------------------------------------------- modules

def module_name(path: str) -> str:
    base = os.path.basename(path)
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def resolve_modules(moddir: str, wanted: list[str]) -> list[str]:
    """Paths of the wanted modules and their dependencies, in a valid load order."""
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(os.path.join(moddir, "kernel")):
        for fn in files:
            if re.search(r"\.ko(\.(xz|zst|gz))?$", fn):
                index[module_name(fn)] = os.path.join(dirpath, fn)
    builtin: set[str] = set()
    bpath = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bpath):
        with open(bpath) as f:
            builtin = {module_name(line.strip()) for line in f if line.strip()}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "active":
            raise BuildError(f"module dependency cycle at {name}")
        if name not in index:
            raise BuildError(f"kernel module {name} not found in {moddir}")
        state[name] = "active"
        deps = run(["modinfo", "-F", "depends", index[name]]).stdout.strip()
        for dep in filter(None, deps.split(",")):
            visit(dep)
        state[name] = "done"
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def copy_module(src: str, dst: str) -> None:
    if src.endswith(".xz"):
        with lzma.open(src) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
    elif src.endswith(".gz"):
        import gzip
        with gzip.open(src) as f, open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
    elif src.endswith(".zst"):
        run(["zstd", "-q", "-d", "-f", src, "-o", dst])
    else:
        shutil.copyfile(src, dst)


# --------------------------------------------------------------------------- binaries

def ldd_libs(binary: str) -> list[str]:
    out = run(["ldd", binary]).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+\s+=>\s+(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
        elif line.startswith("/"):
            libs.append(line.split()[0])  # the loader
        elif "=>" in line and "not found" in line:
            raise BuildError(f"ldd {binary}: {line}")
    return libs


def copy_into(root: str, src: str, rel: str, mode: int | None = None) -> None:
    dst = os.path.join(root, rel.lstrip("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.unlink(dst)  # e.g. a busybox applet link: replace it, never write through it
    shutil.copyfile(src, dst)  # follows symlinks in src: the guest gets the real file
    os.chmod(dst, mode if mode is not None else stat.S_IMODE(os.stat(src).st_mode))


def busybox_root(root: str, dirs: list[str]) -> None:
    """``dirs`` and the usual top directories under ``root``, /dev/console, and busybox with
    one link per applet."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "tmp", *dirs):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    # The kernel opens /dev/console for /init before anything is mounted.
    try:
        os.mknod(os.path.join(root, "dev/console"), 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    except PermissionError:
        log("not root: no /dev/console node in the initramfs (init reopens it after devtmpfs)")
    copy_into(root, BUSYBOX, "bin/busybox", 0o755)
    applets = run([BUSYBOX, "--list-full"]).stdout.split()
    for rel in applets:
        dst = os.path.join(root, rel)
        if os.path.lexists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # relative, so that the link never points at a host file while the tree is built
        os.symlink(os.path.relpath(os.path.join(root, "bin/busybox"), os.path.dirname(dst)), dst)
    log(f"busybox with {len(applets)} applets")


def make_cpio(root: str, out: str) -> None:
    entries = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            entries.append(rel)
        for fn in sorted(files):
            entries.append(os.path.normpath(os.path.join(rel, fn)))
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        r = subprocess.run([BUSYBOX, "cpio", "-o", "-H", "newc"], cwd=root, stdout=f,
                           input=("\n".join(entries) + "\n").encode(), stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise BuildError(f"busybox cpio failed ({r.returncode}): {r.stderr.decode().strip()}")
    os.rename(tmp, out)


# --------------------------------------------------------------------------- the builder

@contextlib.contextmanager
def locked(cache: str) -> Iterator[None]:
    """One builder at a time in ``cache`` (made if missing)."""
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached_guest(cache: str, key: str) -> dict | None:
    """The metadata of the guest built in ``cache`` if it was built from inputs ``key`` and
    its kernel and initramfs are still there, else None."""
    try:
        with open(os.path.join(cache, "guest.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    initramfs = os.path.join(cache, "initramfs.cpio")
    if (meta.get("key") == key and os.path.exists(os.path.join(cache, "vmlinux"))
            and os.path.exists(initramfs)
            and os.path.getsize(initramfs) == meta.get("initramfs_size")):
        return dict(meta)
    return None


Populate = Callable[[str, str, str], dict]   # (root, moddir, kver) -> what goes into the meta


def build(cache: str, key: str, deb: Callable[[], str], populate: Populate, *,
          check: Callable[[str], None] | None = None, force: bool = False) -> dict:
    """The guest in ``cache`` for inputs ``key`` (call under ``locked(cache)``): the cached one,
    or one built from the kernel package ``deb()`` returns, its root filled by ``populate``
    (``check(config_path)`` first judges the kernel's config).  Returns its description (paths
    in the cache).  Raises BuildError."""
    meta = None if force else cached_guest(cache, key)
    if meta is not None:
        return meta
    missing = needs.missing(BUILD_NEEDS)
    if missing:
        raise BuildError(needs.explain("building a test guest", missing, "scripts/setup --vm"))
    meta_path = os.path.join(cache, "guest.json")
    vmlinux = os.path.join(cache, "vmlinux")
    initramfs = os.path.join(cache, "initramfs.cpio")
    t0 = time.monotonic()
    log(f"building the test guest in {cache}")
    for stale in (meta_path, initramfs):
        if os.path.exists(stale):
            os.unlink(stale)
    package = deb()
    work = tempfile.mkdtemp(prefix="build-", dir=cache)
    try:
        kroot = os.path.join(work, "kernel")
        log(f"unpacking {os.path.basename(package)} with dpkg-deb -x")
        run(["dpkg-deb", "-x", package, kroot])
        vmlinuzs = glob.glob(os.path.join(kroot, "boot", "vmlinuz-*"))
        if len(vmlinuzs) != 1:
            raise BuildError(f"expected one vmlinuz in {package}, found {vmlinuzs}")
        kver = os.path.basename(vmlinuzs[0])[len("vmlinuz-"):]
        if check is not None:
            check(os.path.join(kroot, "boot", f"config-{kver}"))
        # Debian 13 ships the modules under usr/lib/modules (merged /usr), Debian 12 lib/modules.
        moddirs = [d for d in (os.path.join(kroot, "usr", "lib", "modules", kver),
                               os.path.join(kroot, "lib", "modules", kver)) if os.path.isdir(d)]
        if not moddirs:
            raise BuildError(f"no modules directory for {kver} in {package}")
        # The guest boots the extracted ELF vmlinux through PVH, not the bzImage, because it is
        # faster on both: measured under TCG on 2 shared cores, QEMU start to /init's first
        # line, 2 x 5 runs alternating, median (range):
        #   Debian 13, 6.12, zstd bzImage 3.6-3.9 s (3.2-4.2) vs vmlinux 3.0 s (2.7-3.6)
        #   Debian 12, 6.1,  xz bzImage   5.5 s (5.2-6.2)     vs vmlinux 2.2 s (2.1-2.4)
        # The extraction costs 0.4 s (zstd) / 0.8 s (xz) once per guest build.
        compression = extract_vmlinux(vmlinuzs[0], vmlinux)
        log(f"kernel {kver}: extracted the uncompressed vmlinux from the {compression} bzImage "
            "(for a PVH boot)")
        root = os.path.join(work, "root")
        info = populate(root, moddirs[0], kver)
        log("writing the newc initramfs with busybox cpio")
        make_cpio(root, initramfs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "key": key,
        "kernel_package": os.path.basename(package),
        "kernel_version": kver,
        "kernel_compression": compression,
        "vmlinux": vmlinux,
        "initramfs": initramfs,
        "initramfs_size": os.path.getsize(initramfs),
        "build_seconds": round(time.monotonic() - t0, 1),
        **info,
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.rename(meta_path + ".tmp", meta_path)
    log(f"guest ready in {meta['build_seconds']} s: vmlinux {os.path.getsize(vmlinux) >> 20} MiB, "
        f"initramfs {meta['initramfs_size'] >> 10} KiB")
    return meta


# --------------------------------------------------------------------------- the kernel client

def input_key() -> str:
    h = hashlib.sha256()
    h.update(f"format {FORMAT}\n".encode())
    for path in (os.path.abspath(__file__), INIT_SCRIPT):
        with open(path, "rb") as f:
            h.update(f.read())
    for pkg in HOST_PACKAGES:
        h.update(f"{pkg}={package_version(pkg)}\n".encode())
    return h.hexdigest()


def populate_root(root: str, moddir: str, kver: str) -> dict:
    """busybox, nbd-client and mke2fs with their libraries, the modules (flat, and their load
    order in /etc/vblk-modules) and /init."""
    busybox_root(root, ["mnt", "run", "root", f"lib/modules/{kver}"])
    # nbd-client, mke2fs (+ mkfs.ext4 link), their libraries and the loader
    libs: set[str] = set()
    for src, rel in PROGRAMS.items():
        copy_into(root, src, rel, 0o755)
        libs.update(ldd_libs(src))
    link = os.path.join(root, "sbin/mkfs.ext4")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("mke2fs", link)
    for lib in sorted(libs):
        copy_into(root, lib, lib, 0o755)
    if os.path.exists("/etc/mke2fs.conf"):
        copy_into(root, "/etc/mke2fs.conf", "etc/mke2fs.conf", 0o644)
    lib_names = " ".join(os.path.basename(lib) for lib in sorted(libs))
    log(f"nbd-client, mke2fs and {len(libs)} libraries: {lib_names}")

    # kernel modules, flat, plus their load order
    names = []
    for src in resolve_modules(moddir, WANTED_MODULES):
        name = module_name(src) + ".ko"
        copy_module(src, os.path.join(root, f"lib/modules/{kver}", name))
        names.append(name)
    with open(os.path.join(root, "etc/vblk-modules"), "w") as f:
        for name in names:
            f.write(f"/lib/modules/{kver}/{name}\n")
    log(f"modules in load order: {' '.join(n[:-3] for n in names)}")

    copy_into(root, INIT_SCRIPT, "init", 0o755)
    return {"modules": [n[:-3] for n in names], "libraries": sorted(libs),
            "busybox_sha256": sha256_file(BUSYBOX)}


def ensure_guest(cache: str = DEFAULT_CACHE, force: bool = False) -> dict:
    """The kernel-client guest's description (paths in the cache), building whatever is
    missing.  Raises BuildError saying what is missing and which package provides it."""
    missing = needs.missing(CLIENT_NEEDS)
    if missing:
        raise BuildError(needs.explain("the kernel-client guest", missing, "scripts/setup --vm"))
    with locked(cache):
        return build(cache, input_key(), lambda: kernel_deb(cache), populate_root, force=force)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="cache directory (default: %(default)s)")
    args = ap.parse_args()
    try:
        meta = ensure_guest(args.cache, args.force)
    except BuildError as e:
        print(f"build_guest: {e}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
