"""The processes of a Flower deployment on this machine: a SuperLink, SuperNodes and ``flwr``
started by ``Processes``, each in its own session with its own log, working folder and
``FLWR_HOME``, all carrying one token in their environment, so that ``stop`` finds every one of
them (``fedsparse.processes``), however Flower started and reparented them.

``fedsparse devices`` and the deployment tests run their SuperLink and SuperNodes with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import psutil

from fedsparse import processes

HOST = "127.0.0.1"
TOKEN_VAR = "FEDSPARSE_DEVICES_TOKEN"  # in the environment of every process started here
TERM_GRACE = 10.0


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise ValueError(f"{name} not found next to {sys.executable} nor on PATH; install flwr in this environment")
    return found


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Processes:
    """Every process this command starts: each in a session of its own (a terminal's Ctrl-C
    reaches the command, which stops them), found again by a token in their environment."""

    token_var = TOKEN_VAR  # the environment variable that carries ``token`` (tests use their own)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def env(self, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
                   FLWR_TELEMETRY_ENABLED="0", MPLCONFIGDIR=str(self.root / "mplconfig"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **{self.token_var: self.token})
        env.update(extra or {})
        return env

    def spawn(self, name: str, args: list[str], home: Path, extra_env: dict[str, str] | None = None,
              preexec: Callable[[], None] | None = None) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        cwd = self.root / "cwd" / name
        cwd.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(args, cwd=cwd, env=self.env(home, extra_env), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=preexec is None,
                                    preexec_fn=preexec)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def wait_listening(self, name: str, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}: "
                                   f"{' '.join(self.log(name).split()[-30:])}")
            try:
                with socket.create_connection((HOST, port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} not listening on {HOST}:{port} after {timeout:.0f}s")

    def stop(self, grace: float = TERM_GRACE, reap: float = 2.0) -> list[int]:
        """SIGTERM every process started here, its descendants and every process carrying the
        token (also those started while they stop), SIGKILL what is left after ``grace``
        seconds; returns the pids still alive afterwards (should be none)."""
        started = list(self.procs.values())

        def found() -> list[psutil.Process]:
            for proc in started:
                proc.poll()  # reaped here, its exit code stays with its Popen
            return processes.run_processes([p.pid for p in started], self.token_var, self.token)

        left = processes.stop(found(), grace, find=found)
        for proc in started:
            try:
                proc.wait(timeout=reap)
            except subprocess.TimeoutExpired:
                pass
        return [p.pid for p in left]
