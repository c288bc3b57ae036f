"""Build the Cloudland test guest: a small bootable qcow2 made only from Debian packages.

Layout: an MBR disk (syslinux ``mbr.bin``) with one FAT16 partition holding syslinux, the
Debian cloud kernel and a busybox initramfs whose ``/init`` is ``files/init``. SeaBIOS boots
it from a virtio-blk disk like any cloud image; nothing on the host is installed or mounted.

Run-time needs (Debian): apt (apt-get/apt-cache), dpkg, kmod (depmod), busybox-static,
syslinux + syslinux-common, mtools, dosfstools, qemu-utils.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloudland.guest import BOOT_MARKER

# Bump when the image layout or build steps change: the cache key includes it.
BUILDER_VERSION = 5
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Modules the guest needs, by name; their dependencies come from modules.dep.
GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "button", "evdev")
# Loaded when the kernel has them as modules (built in otherwise): isofs for the config drive.
OPTIONAL_GUEST_MODULES = ("isofs",)
KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=10 i8042.noaux i8042.nokbd"
FILES_DIR = Path(__file__).parent / "files"
BUSYBOX = Path("/bin/busybox")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
DISK_MIB = 32
PART_START_SECTOR = 2048


class GuestBuildError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLOUDLAND_CACHE_DIR") or "/var/cache/cloudland")


def _run(args: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel that ``linux-image-cloud-amd64`` currently depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-cloud-amd64)", out)
    if not m:
        raise GuestBuildError(f"cannot resolve the kernel from {KERNEL_META_PACKAGE}: {out!r}")
    package = m.group(1)
    show = _run(["apt-cache", "show", "--no-all-versions", package])
    v = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    return package, v.group(1) if v else "unknown"


def _inputs_digest() -> str:
    h = hashlib.sha256(f"builder={BUILDER_VERSION};cmdline={KERNEL_CMDLINE};".encode())
    for path in [*sorted(FILES_DIR.iterdir()), BUSYBOX, SYSLINUX_MBR]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _cache_name(package: str, version: str) -> str:
    kver = package.removeprefix("linux-image-")
    safe_version = re.sub(r"[^A-Za-z0-9.+-]", "_", version)
    return f"cloudland-test-guest-{kver}-{safe_version}-b{BUILDER_VERSION}-{_inputs_digest()}.qcow2"


def build_test_guest(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the cached test-guest qcow2, building it first if needed (or if ``force``)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        package, version = resolve_kernel_package()
    except (GuestBuildError, OSError):
        # No apt metadata (offline host): any earlier build is better than nothing.
        cached = sorted(cache_dir.glob("cloudland-test-guest-*.qcow2"), key=lambda p: p.stat().st_mtime)
        if cached and not force:
            return cached[-1]
        raise
    target = cache_dir / _cache_name(package, version)
    if target.exists() and not force:
        return target
    with open(cache_dir / ".test-guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same image
        if target.exists() and not force:
            return target
        with tempfile.TemporaryDirectory(prefix="cloudland-guest-", dir=cache_dir) as tmp:
            work = Path(tmp)
            # apt-get download drops privileges to _apt, which needs to write here.
            work.chmod(0o755)
            raw = _build_raw_disk(work, package)
            partial = work / "disk.qcow2"
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(partial)])
            os.replace(partial, target)
    return target


def _build_raw_disk(work: Path, package: str) -> Path:
    _run(["apt-get", "download", "-q", package], cwd=work)
    debs = list(work.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download produced no {package} .deb")
    root = work / "kernel"
    _run(["dpkg", "-x", str(debs[0]), str(root)])
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    kver = vmlinuz.name.removeprefix("vmlinuz-")
    _run(["depmod", "-b", str(root), kver])
    modules_dir = _modules_dir(root, kver)
    order = module_load_order(modules_dir / "modules.dep", GUEST_MODULES, OPTIONAL_GUEST_MODULES)

    initrd = work / "initrd.gz"
    initrd.write_bytes(gzip.compress(_initramfs_cpio(modules_dir, order), compresslevel=6))

    part = work / "part.img"
    part_kib = (DISK_MIB * 1024) - PART_START_SECTOR // 2
    _run(["mkfs.vfat", "-C", "-F", "16", "-h", str(PART_START_SECTOR), "-n", "CLOUDLAND",
          str(part), str(part_kib)])
    _run(["syslinux", "--install", str(part)])
    cfg = work / "syslinux.cfg"
    cfg.write_text(
        "DEFAULT cloudland\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL cloudland\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND {KERNEL_CMDLINE}\n"
    )
    kernel_copy = work / "vmlinuz"
    shutil.copyfile(vmlinuz, kernel_copy)
    _run(["mcopy", "-i", str(part), str(kernel_copy), str(initrd), str(cfg), "::/"])

    disk = work / "disk.raw"
    with open(disk, "wb") as out:
        out.write(_mbr(part.stat().st_size // 512))
        out.seek(PART_START_SECTOR * 512)
        with open(part, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    return disk


def _modules_dir(root: Path, kver: str) -> Path:
    for candidate in (root / "lib" / "modules" / kver, root / "usr" / "lib" / "modules" / kver):
        if (candidate / "modules.dep").exists():
            return candidate
    raise GuestBuildError(f"no modules.dep for {kver} under {root}")


def module_load_order(modules_dep: Path, wanted: tuple[str, ...],
                      optional: tuple[str, ...] = ()) -> list[str]:
    """Module paths (relative to the modules dir) in an order insmod accepts."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        # modprobe loads the listed dependencies from last to first.
        for dep in reversed(deps.get(mod, [])):
            visit(dep)
        order.append(mod)

    for name in wanted + tuple(o for o in optional if o in by_name):
        if name not in by_name:
            raise GuestBuildError(f"kernel module {name} not found (built in?)")
        visit(by_name[name])
    return order


def _mbr(part_sectors: int) -> bytes:
    mbr = bytearray(512)
    code = SYSLINUX_MBR.read_bytes()[:440]
    mbr[: len(code)] = code
    entry = bytearray(16)
    entry[0] = 0x80  # active: mbr.bin boots the active partition
    entry[1:4] = b"\xfe\xff\xff"  # CHS unused (LBA only)
    entry[4] = 0x0E  # FAT16 LBA
    entry[5:8] = b"\xfe\xff\xff"
    entry[8:12] = PART_START_SECTOR.to_bytes(4, "little")
    entry[12:16] = part_sectors.to_bytes(4, "little")
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


class _Cpio:
    """A minimal newc cpio writer: lets us add device nodes without being root or mknod."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        self.ino += 1
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob + data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _initramfs_cpio(modules_dir: Path, order: list[str]) -> bytes:
    init = (FILES_DIR / "init").read_bytes()
    if BOOT_MARKER.encode() not in init:
        raise GuestBuildError("files/init does not print BOOT_MARKER")
    cpio = _Cpio()
    for d in ("bin", "sbin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run", "var",
              "usr", "usr/bin", "usr/sbin", "root"):
        cpio.dir(d)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = _run([str(BUSYBOX), "--list"]).split()
    for applet in applets:
        if applet not in ("busybox", "linuxrc"):
            cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", init, 0o755)
    cpio.file("etc/udhcpc.script", (FILES_DIR / "udhcpc.script").read_bytes(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    names = []
    for rel in order:
        flat = Path(rel).name
        cpio.file(f"lib/modules/{flat}", (modules_dir / rel).read_bytes())
        names.append(flat)
    cpio.file("etc/modules.order", ("\n".join(names) + "\n").encode())
    return cpio.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find cached) the Cloudland test guest image")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    start = time.monotonic()
    path = build_test_guest(args.cache_dir, force=args.force)
    print(path)
    print(f"# {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
