"""Child-process plumbing: start with a log file, stop for sure, poll with a deadline."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet.local.processes import free_port

__all__ = ["Process", "StartupError", "free_port", "start", "stop", "wait_until"]


class StartupError(RuntimeError):
    """A component died or did not become ready in time."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def _die_with_parent() -> None:
    # If the test process is SIGKILLed, its atexit/finally hooks never run; PDEATHSIG makes
    # the kernel kill the control plane with it, so no etcd or apiserver lingers on a CI box.
    # (It fires when the *thread* that forked exits: start clusters from a long-lived thread.)
    with contextlib.suppress(OSError):  # not glibc Linux: no safety net, stop() still works
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start(name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() can signal all of it
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
    return Process(name, popen, log_path)


def stop(proc: Process, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.popen.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.popen.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    watch: Sequence[Process] = (),
    interval: float = 0.25,
) -> None:
    """Poll `check` until it returns True; fail fast if a watched process exits.

    `check` may raise: errors count as "not yet" and the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        for proc in watch:
            if not proc.alive():
                raise StartupError(
                    f"{proc.name} exited with code {proc.popen.returncode} while waiting for {what}; "
                    f"last log lines ({proc.log_path}):\n{proc.log_tail()}"
                )
        try:
            if check():
                return
        except Exception as exc:  # any failure means "not ready yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
