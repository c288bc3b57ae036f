"""The QEMU compute driver: one daemonised QEMU per instance, controlled over QMP.

Everything about an instance lives in ``<state_dir>/instances/<id>/``: ``disk.qcow2`` (an
overlay on the cached base image), ``spec.json``, ``qemu.pid``, ``qmp.sock``, ``vnc.sock``,
``console.log`` (appended across power cycles) and ``qemu.log`` (QEMU's own stderr). QEMU
exits when the guest powers off, so "running" means "the pid in qemu.pid is alive and is our
QEMU"; an agent restart therefore re-attaches by reading those files, never by killing.

Reboot: ``hard`` is QMP ``system_reset`` (the reset button: no guest cooperation, same QEMU
process). ``soft`` is what Nova's libvirt driver does: ACPI powerdown, wait for the guest to
power off (up to ``reboot_timeout``, then kill), and start a fresh QEMU from ``spec.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from cloudland.agent.drivers.compute import configdrive
from cloudland.agent.drivers.compute.accel import accel_args, choose_accel
from cloudland.agent.drivers.compute.base import ComputeDriver, PowerState
from cloudland.bus.messages import InstanceSpec, Resources

log = logging.getLogger(__name__)

GIB = 1 << 30
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Re-send the ACPI powerdown this often while waiting: a guest still booting misses it.
POWERDOWN_RETRY_SECONDS = 5.0
QMP_TIMEOUT = 5.0
_PAUSED_STATUSES = {"paused", "suspended", "inmigrate", "postmigrate", "prelaunch", "debug",
                    "restore-vm", "save-vm", "finish-migrate", "io-error", "watchdog"}


class QemuDriverError(RuntimeError):
    pass


@dataclass(frozen=True)
class InstancePaths:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def spec(self) -> Path:
        return self.dir / "spec.json"

    @property
    def pid(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def vnc(self) -> Path:
        return self.dir / "vnc.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def config_drive(self) -> Path:
        return self.dir / "config-drive.iso"


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def machine_args(accel: str, memory_mb: int, vcpus: int) -> list[str]:
    """Machine, accelerator, memory and CPUs: shared with bench/raw_qemu_boot.py."""
    return ["-machine", "q35", *accel_args(accel), "-nodefaults", "-no-user-config",
            "-m", str(memory_mb), "-smp", str(vcpus), "-rtc", "base=utc"]


def disk_args(disk: Path, fmt: str = "qcow2") -> list[str]:
    """The root disk as virtio-blk: shared with bench/raw_qemu_boot.py."""
    return ["-drive", f"file={_opt(disk)},if=none,id=disk0,format={fmt},discard=unmap",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=0"]


def smbios_args(instance_id: str) -> list[str]:
    # cloud-init only asks the metadata service when the product is "OpenStack Nova".
    value = f"type=1,manufacturer=Cloudland,product=OpenStack Nova,serial={instance_id}"
    with contextlib.suppress(ValueError):
        value += f",uuid={uuid.UUID(instance_id)}"
    return ["-smbios", value]


def _proc_is_ours(pid: int, marker: str) -> bool:
    """True if ``pid`` is a live (non-zombie) process whose command line contains ``marker``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X") and marker.encode() in cmdline.split(b"\0")


async def _run(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuDriverError(f"{args[0]} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    return out.decode()


def _tail_lines(path: Path, length: int | None) -> str:
    with open(path, "rb") as f:
        if length is None:
            data = f.read()
        else:
            f.seek(0, os.SEEK_END)
            pos = f.tell()
            data = b""
            while pos > 0 and data.count(b"\n") <= length:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    text = data.decode(errors="replace").replace("\r\n", "\n")
    if length is None:
        return text
    if length <= 0:
        return ""
    lines = text.splitlines(keepends=True)
    return "".join(lines[-length:])


@contextlib.contextmanager
def unix_socket_path(path: Path) -> Iterator[str]:
    """A connectable name for a UNIX socket even when ``path`` exceeds the 108-byte limit.

    Long paths go through an O_PATH descriptor of the directory (/proc/self/fd/N/name).
    """
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class QemuDriver(ComputeDriver):
    name = "qemu"

    def __init__(self, state_dir: Path, accel: str = "auto", qemu_binary: str = "qemu-system-x86_64",
                 reboot_timeout: float = 60.0) -> None:
        # Absolute: the path is part of QEMU's command line, which is how we recognise our QEMUs.
        self.state_dir = Path(state_dir).absolute()
        self.instances_dir = self.state_dir / "instances"
        self.accel = choose_accel(accel)
        self.qemu_binary = qemu_binary
        self.reboot_timeout = reboot_timeout
        self._op_locks: dict[str, asyncio.Lock] = {}
        self._qmp_locks: dict[str, asyncio.Lock] = {}

    # --- helpers -----------------------------------------------------------------------------

    def paths(self, instance_id: str) -> InstancePaths:
        if not _SAFE_ID.match(instance_id):
            raise QemuDriverError(f"invalid instance id {instance_id!r}")
        return InstancePaths(self.instances_dir / instance_id)

    def _op_lock(self, instance_id: str) -> asyncio.Lock:
        return self._op_locks.setdefault(instance_id, asyncio.Lock())

    def pid(self, instance_id: str) -> int | None:
        """The pid of this instance's running QEMU, or None."""
        paths = self.paths(instance_id)
        try:
            pid = int(paths.pid.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _proc_is_ours(pid, str(paths.pid)) else None

    async def qmp(self, instance_id: str, command: str, arguments: dict[str, Any] | None = None,
                  timeout: float = QMP_TIMEOUT) -> Any:
        """Run one QMP command on the instance's monitor (one connection per call)."""
        paths = self.paths(instance_id)
        async with self._qmp_locks.setdefault(instance_id, asyncio.Lock()):
            client = QMPClient(f"cloudland-{instance_id}")
            try:
                with unix_socket_path(paths.qmp) as address:
                    await asyncio.wait_for(client.connect(address), timeout)
                return await asyncio.wait_for(client.execute(command, arguments), timeout)
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()

    async def _wait_exit(self, instance_id: str, timeout: float,
                         retry_powerdown: bool = False) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_powerdown = loop.time() + POWERDOWN_RETRY_SECONDS
        while self.pid(instance_id) is not None:
            now = loop.time()
            if now >= deadline:
                return False
            if retry_powerdown and now >= next_powerdown:
                next_powerdown = now + POWERDOWN_RETRY_SECONDS
                with contextlib.suppress(QMPError, OSError, TimeoutError):
                    await self.qmp(instance_id, "system_powerdown", timeout=1.0)
            await asyncio.sleep(0.1)
        return True

    async def _kill(self, instance_id: str) -> None:
        pid = self.pid(instance_id)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not await self._wait_exit(instance_id, 10.0):
            raise QemuDriverError(f"QEMU {pid} of {instance_id} survived SIGKILL")

    def _load_spec(self, instance_id: str) -> InstanceSpec:
        try:
            return msgspec.json.decode(self.paths(instance_id).spec.read_bytes(), type=InstanceSpec)
        except FileNotFoundError:
            raise QemuDriverError(f"instance {instance_id} is not prepared")

    def command(self, spec: InstanceSpec) -> list[str]:
        """QEMU's full command line for ``spec``; run it in the instance directory.

        The sockets are relative to it: UNIX socket paths are limited to 108 bytes and
        QEMU binds them before -daemonize changes directory.
        """
        p = self.paths(spec.id)
        args = [self.qemu_binary, "-name", f"guest={spec.id}",
                *machine_args(self.accel, spec.memory_mb, spec.vcpus),
                "-daemonize", "-pidfile", str(p.pid), "-msg", "timestamp=on",
                "-chardev", f"socket,id=qmp,path={p.qmp.name},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                "-chardev", f"file,id=serial0,path={_opt(p.console)},append=on",
                "-serial", "chardev:serial0",
                "-vnc", f"unix:{p.vnc.name}", "-device", "VGA",
                *disk_args(p.disk),
                "-object", "rng-random,id=rng0,filename=/dev/urandom",
                "-device", "virtio-rng-pci,rng=rng0",
                *smbios_args(spec.id)]
        if spec.config_drive:
            # A read-only virtio disk: the Debian cloud kernel has no AHCI for a CD-ROM.
            args += ["-drive", f"file={_opt(p.config_drive)},if=none,id=config2,format=raw,readonly=on",
                     "-device", "virtio-blk-pci,drive=config2"]
        for i, port in enumerate(spec.ports):
            args += ["-netdev", f"tap,id=net{i},ifname={port.tap_name},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=net{i},mac={port.mac_address},"
                                f"host_mtu={port.mtu},romfile="]
        return args

    # --- ComputeDriver -----------------------------------------------------------------------

    async def init_host(self) -> None:
        await asyncio.to_thread(self.instances_dir.mkdir, parents=True, exist_ok=True)
        states = await self.list_instances()
        running = sum(1 for s in states.values() if s != "stopped")
        log.info("qemu driver: %d instances, %d running, accel %s", len(states), running, self.accel)

    def resources(self) -> Resources:
        memory_kib = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_kib = int(line.split()[1])
                    break
        path = self.state_dir
        while not path.exists():
            path = path.parent
        return Resources(vcpus=os.cpu_count() or 1, memory_mb=memory_kib // 1024,
                         disk_gb=shutil.disk_usage(path).total // GIB)

    async def list_instances(self) -> dict[str, PowerState]:
        def scan() -> list[str]:
            if not self.instances_dir.is_dir():
                return []
            return sorted(d.name for d in self.instances_dir.iterdir()
                          if _SAFE_ID.match(d.name) and (d / "spec.json").exists())

        ids = await asyncio.to_thread(scan)
        states = await asyncio.gather(*(self.power_state(i) for i in ids))
        return {i: s for i, s in zip(ids, states, strict=True) if s != "absent"}

    async def power_state(self, instance_id: str) -> PowerState:
        paths = self.paths(instance_id)
        if not paths.spec.exists():
            return "absent"
        if self.pid(instance_id) is None:
            return "stopped"
        try:
            status = await self.qmp(instance_id, "query-status", timeout=2.0)
        except (TimeoutError, QMPError, OSError):
            # The monitor may be busy or QEMU just exiting; liveness is the better signal.
            return "running" if self.pid(instance_id) is not None else "stopped"
        return "paused" if status.get("status") in _PAUSED_STATUSES else "running"

    async def prepare(self, spec: InstanceSpec, base_image: Path | None) -> None:
        paths = self.paths(spec.id)
        async with self._op_lock(spec.id):
            await asyncio.to_thread(paths.dir.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(_write_atomic, paths.spec, msgspec.json.encode(spec))
            if spec.config_drive:
                await asyncio.to_thread(configdrive.write_iso, spec, paths.config_drive)
            else:
                paths.config_drive.unlink(missing_ok=True)
            if paths.disk.exists():
                return
            size = spec.disk_gb * GIB
            partial = paths.dir / "disk.qcow2.partial"
            create = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if base_image is not None:
                base = Path(base_image).absolute()
                fmt = spec.image.disk_format if spec.image else None
                info = json.loads(await _run("qemu-img", "info", "-U", "--output=json",
                                             *(["-f", fmt] if fmt else []), str(base)))
                create += ["-b", str(base), "-F", info["format"], str(partial)]
                if size > info["virtual-size"]:
                    create.append(str(size))
            else:
                create += [str(partial), str(size or GIB)]
            await _run(*create)
            await asyncio.to_thread(os.replace, partial, paths.disk)

    async def power_on(self, spec: InstanceSpec) -> None:
        async with self._op_lock(spec.id):
            await self._start(spec)

    async def _start(self, spec: InstanceSpec) -> None:
        paths = self.paths(spec.id)
        if self.pid(spec.id) is not None:
            return
        if not paths.disk.exists():
            raise QemuDriverError(f"instance {spec.id} is not prepared (no disk)")
        await asyncio.to_thread(_write_atomic, paths.spec, msgspec.json.encode(spec))
        for stale in (paths.pid, paths.qmp, paths.vnc):
            stale.unlink(missing_ok=True)
        with open(paths.qemu_log, "ab") as err:
            err.write(f"--- start {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
            err.flush()
            # With -daemonize this returns once QEMU is initialised (or failed to).
            proc = await asyncio.create_subprocess_exec(
                *self.command(spec), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=err, cwd=paths.dir)
            rc = await proc.wait()
        if rc != 0 or self.pid(spec.id) is None:
            tail = await asyncio.to_thread(_tail_lines, paths.qemu_log, 10)
            raise QemuDriverError(f"QEMU for {spec.id} failed to start (rc {rc}): {tail.strip()}")

    async def power_off(self, instance_id: str, timeout: float) -> None:
        async with self._op_lock(instance_id):
            await self._power_off(instance_id, timeout)

    async def _power_off(self, instance_id: str, timeout: float) -> None:
        if self.pid(instance_id) is None:
            return
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            await self.qmp(instance_id, "system_powerdown")
        if await self._wait_exit(instance_id, timeout, retry_powerdown=True):
            return
        log.warning("instance %s ignored ACPI powerdown for %.0fs; stopping it", instance_id, timeout)
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            await self.qmp(instance_id, "quit", timeout=2.0)
        if not await self._wait_exit(instance_id, 3.0):
            await self._kill(instance_id)

    async def reboot(self, instance_id: str, hard: bool) -> None:
        async with self._op_lock(instance_id):
            spec = await asyncio.to_thread(self._load_spec, instance_id)
            if self.pid(instance_id) is None:
                await self._start(spec)
            elif hard:
                await self.qmp(instance_id, "system_reset")
            else:
                await self._power_off(instance_id, self.reboot_timeout)
                await self._start(spec)

    async def destroy(self, instance_id: str) -> None:
        paths = self.paths(instance_id)
        async with self._op_lock(instance_id):
            await self._kill(instance_id)
            await asyncio.to_thread(shutil.rmtree, paths.dir, ignore_errors=True)
        self._op_locks.pop(instance_id, None)
        self._qmp_locks.pop(instance_id, None)

    async def console_output(self, instance_id: str, length: int | None) -> str | None:
        paths = self.paths(instance_id)
        if not paths.dir.is_dir():
            return None
        try:
            return await asyncio.to_thread(_tail_lines, paths.console, length)
        except FileNotFoundError:
            return ""

    async def close(self) -> None:
        # QMP connections are per call; nothing stays open and guests keep running.
        return None
