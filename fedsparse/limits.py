"""Operating-system limits on a process tree: memory and CPU, one set per emulated device.

``Limits`` picks the strongest kind available, first:

- **cgroup v1 or v2** (where this process may create child cgroups, e.g. as root): a memory
  cgroup per device whose limit is the profile's ``memory_mib``: the memory of the device it
  stands for, which its whole SuperNode (``flower-supernode``, ``flower-superexec`` and the
  ClientApp process) must fit; a device that exceeds it is stopped by the kernel's OOM killer
  inside its cgroup (the round counts it as failed, the run goes on). The CPU quota is
  ``threads`` cores (``cpu.cfs_quota_us`` / ``cpu.max``).
- **otherwise** ``RLIMIT_AS`` on the SuperNode (inherited by its children), set to the limit
  above plus ``AS_HEADROOM_MIB``: a Python process with torch maps about 3.6 GiB of address
  space for 0.7 GiB resident, so an address-space limit can only catch a gross overrun; and
  the CPU affinity is pinned to ``threads`` cores.

``fedsparse devices`` (``fedsparse.commands.devices``) limits each device's SuperNode this way.
"""

from __future__ import annotations

import os
import re
import resource
import time
from pathlib import Path
from typing import Any, Callable, Protocol

AS_HEADROOM_MIB = 4096  # RLIMIT_AS fallback: torch's address space is ~3.6 GiB for ~0.7 GiB resident


class Limited(Protocol):
    """What ``Limits`` limits: a device of ``fedsparse devices`` (``fedsparse.commands.devices.Device``)."""

    limit_mib: int  # its memory limit, MiB
    profile: Any  # its ``fedsparse.profiles.Profile``: ``threads`` cores
    cgroups: list[Path]  # filled by ``Limits.prepare``

    @property
    def label(self) -> str: ...


def own_cgroups() -> dict[str, str]:
    """This process's cgroups: controller (``""``: the cgroup v2 hierarchy) -> its path in the
    hierarchy; {} where there are none (not Linux)."""
    own = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path
    except OSError:
        return {}
    return own


class Limits:
    """Per-device memory and CPU limits: cgroups where this process may create them, else
    ``RLIMIT_AS`` and CPU affinity. ``kind`` says which (``cgroup-v1``, ``cgroup-v2``, ``rlimit``)."""

    def __init__(self, tag: str, prefer: str = "auto") -> None:
        self.tag = tag
        self.kind = "rlimit"
        self.roots: dict[str, Path] = {}  # controller -> the folder our child cgroups go into
        if prefer in ("auto", "cgroup"):
            self._find_cgroups()
        if prefer == "cgroup" and self.kind == "rlimit":
            raise ValueError("--limits cgroup: no writable memory cgroup here (needs cgroup v1 or v2 and the "
                             "right to create child cgroups, e.g. as root); use --limits auto or rlimit")

    def _find_cgroups(self) -> None:
        own = own_cgroups()
        v1 = {c: Path("/sys/fs/cgroup") / c / own[c].lstrip("/") for c in ("memory", "cpu") if c in own}
        if "memory" in v1 and self._writable(v1["memory"], "memory.limit_in_bytes"):
            self.kind, self.roots = "cgroup-v1", {c: p for c, p in v1.items()
                                                  if c == "memory" or self._writable(p, "cpu.cfs_quota_us")}
            return
        if "" in own:
            base = Path("/sys/fs/cgroup") / own[""].lstrip("/")
            for root in (base, Path("/sys/fs/cgroup/unified") / own[""].lstrip("/")):
                if self._writable(root, "memory.max"):
                    self.kind, self.roots = "cgroup-v2", {"memory": root, "cpu": root}
                    return

    def _writable(self, root: Path, probe_file: str) -> bool:
        """Whether a child cgroup can be made under ``root`` and limited through ``probe_file``."""
        probe = root / f"{self.tag}-probe"
        try:
            probe.mkdir()
        except OSError:
            return False
        try:
            if not (probe / probe_file).exists():
                if probe_file == "memory.max":  # v2: the controller may have to be enabled for children
                    try:
                        (root / "cgroup.subtree_control").write_text("+memory +cpu")
                    except OSError:
                        pass
                if not (probe / probe_file).exists():
                    return False
            (probe / probe_file).write_text(str(64 * 2**20) if "memory" in probe_file else "max" if probe_file == "cpu.max" else "-1")
            return True
        except OSError:
            return False
        finally:
            try:
                probe.rmdir()
            except OSError:
                pass

    def describe(self) -> str:
        if self.kind == "cgroup-v1":
            cpu = "cpu.cfs_quota_us = threads cores" if "cpu" in self.roots else "no CPU quota (cpu cgroup not writable)"
            return f"cgroup v1: memory.limit_in_bytes = the profile's memory (whole SuperNode); {cpu}; OMP_NUM_THREADS = threads"
        if self.kind == "cgroup-v2":
            return "cgroup v2: memory.max = the profile's memory (whole SuperNode); cpu.max = threads cores; OMP_NUM_THREADS = threads"
        return (f"RLIMIT_AS = the profile's memory + {AS_HEADROOM_MIB} MiB (address space, a loose bound); "
                "CPU affinity to threads cores; OMP_NUM_THREADS = threads")

    def prepare(self, device: Limited) -> None:
        """Make the device's cgroups and set their limits (cgroups only)."""
        limit = str(device.limit_mib * 2**20)
        quota = device.profile.threads * 100000
        name = f"{self.tag}-{device.label}"
        if self.kind == "cgroup-v1":
            for controller, root in self.roots.items():
                group = root / name
                group.mkdir(exist_ok=True)
                device.cgroups.append(group)
                if controller == "memory":
                    (group / "memory.limit_in_bytes").write_text(limit)
                    _try_write(group / "memory.memsw.limit_in_bytes", limit)  # no swap beyond it
                else:
                    (group / "cpu.cfs_period_us").write_text("100000")
                    (group / "cpu.cfs_quota_us").write_text(str(quota))
        elif self.kind == "cgroup-v2":
            group = self.roots["memory"] / name
            group.mkdir(exist_ok=True)
            device.cgroups.append(group)
            (group / "memory.max").write_text(limit)
            _try_write(group / "memory.swap.max", "0")
            _try_write(group / "cpu.max", f"{quota} 100000")

    def preexec(self, device: Limited) -> Callable[[], None]:
        """Run in the SuperNode's process before it execs: join the cgroups, or set the rlimit."""
        procs = [str(g / "cgroup.procs") for g in device.cgroups]
        limit = (device.limit_mib + AS_HEADROOM_MIB) * 2**20
        cores = set(range(min(device.profile.threads, os.cpu_count() or 1)))
        kind = self.kind

        def run() -> None:
            os.setsid()  # its own process group: stopped as a group
            if kind == "rlimit":
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                try:
                    os.sched_setaffinity(0, cores)
                except OSError:
                    pass
            for path in procs:
                with open(path, "w") as fh:
                    fh.write(str(os.getpid()))

        return run

    def peak_bytes(self, device: Limited) -> int | None:
        """The cgroup's own peak memory (RSS and page cache charged to it), where available."""
        for group in device.cgroups:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                try:
                    return int((group / name).read_text())
                except (OSError, ValueError):
                    continue
        return None

    def oom_kills(self, device: Limited) -> int | None:
        for group in device.cgroups:
            for name in ("memory.oom_control", "memory.events"):
                try:
                    text = (group / name).read_text()
                except OSError:
                    continue
                m = re.search(r"^oom_kill (\d+)", text, re.M)
                if m:
                    return int(m.group(1))
        return None

    def release(self, devices: list[Limited]) -> list[str]:
        """Remove the cgroups (their processes are gone by now); returns those that remain."""
        left = []
        for d in devices:
            for group in d.cgroups:
                for _ in range(20):
                    try:
                        group.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.25)
                else:
                    left.append(str(group))
        return left


def _try_write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False
