"""Child processes on one machine: start with a log file, poll with a deadline, restart, stop for sure.

``gpufleet up`` supervises its pod servers with these; the integration tests and the
benchmarks start their gpufleet processes with the same classes. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

# Loopback polls must not go through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (another process could take it before ours binds it, but the
    kernel hands out ephemeral ports in turn, so a component started at once gets it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; TimeoutError naming ``what`` once the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET ``url`` answers 200; False on any other status or a connection failure."""
    try:
        with _HTTP.open(url, timeout=timeout_s) as response:
            return int(response.status) == 200
    except urllib.error.HTTPError as exc:  # an answer, not 200 (e.g. 503 while loading)
        exc.close()  # it holds the connection: unclosed, it is a ResourceWarning later
        return False
    except (urllib.error.URLError, OSError, ValueError):
        return False


def gpufleet_argv(*args: str) -> list[str]:
    """The ``gpufleet`` command run by this interpreter (works without the console script)."""
    return [sys.executable, "-m", "gpufleet.cli", *args]


class ProcessExited(RuntimeError):
    """A child exited while we were waiting for it to become ready."""


class Process:
    """One child process in its own session, its output appended to ``log_path``.

    ``url`` is where it serves HTTP, if it does; ``start()`` may be called again after it
    exited (a restart appends to the same log)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        url: str = "",
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.url = url
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._log: IO[bytes] | None = None

    def start(self) -> Process:
        self._close_log()
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches all of it, Ctrl-C does not
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def ready(self, path: str = "/ready") -> bool:
        """True when ``url + path`` answers 200; ProcessExited if the process is gone."""
        if not self.alive():
            raise ProcessExited(f"{self.name} exited with {self.returncode}; last log lines:\n{self.log_tail()}")
        return http_ok(self.url + path)

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/ready") -> None:
        wait_until(lambda: self.ready(path), timeout_s, f"{self.name} at {self.url}{path}", interval_s=0.2)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        """Ask the whole process group to stop (SIGCONT first: a stopped process cannot handle SIGTERM)."""
        if self.alive():
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    return

    def wait_or_kill(self, deadline: float) -> None:
        """Wait until ``deadline`` (time.monotonic()), then SIGKILL the process group."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                self.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._close_log()

    def stop(self, timeout_s: float = 20.0) -> None:
        self.terminate()
        self.wait_or_kill(time.monotonic() + timeout_s)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class Supervisor:
    """Starts a set of processes, waits until each serves ``/ready``, restarts those that die
    while serving (up to ``max_restarts`` each), and stops them all."""

    def __init__(
        self, children: Sequence[Process], max_restarts: int, say: Callable[[str], None] = lambda _: None
    ) -> None:
        self.children = list(children)
        self.max_restarts = max_restarts
        self.say = say
        self.stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        for c in self.children:
            c.start()
            self.say(f"starting {c.name} at {c.url} (log: {c.log_path})")

    def wait_ready(self, timeout_s: float, path: str = "/ready") -> None:
        """Block until every child is ready, saying so as each one is; ProcessExited or
        TimeoutError (naming the laggards) otherwise. Long waits say what they wait for."""
        started = time.monotonic()
        deadline = started + timeout_s
        pending = list(self.children)
        last_note = started
        while pending:
            for c in list(pending):
                if c.ready(path):
                    pending.remove(c)
                    done = len(self.children) - len(pending)
                    self.say(f"[{done}/{len(self.children)}] {c.name} ready ({time.monotonic() - started:.1f}s)")
            now = time.monotonic()
            if not pending:
                return
            if now > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f}s: {', '.join(c.name for c in pending)}")
            if now - last_note > 10:
                last_note = now
                self.say(f"waiting for {', '.join(c.name for c in pending)} (loading models, {now - started:.0f}s)")
            time.sleep(0.25)

    def watch(self, interval_s: float = 1.0) -> None:
        """Restart children that die while serving, from a background thread, until stop()."""

        def loop() -> None:
            while not self.stopping.wait(interval_s):
                for c in self.children:
                    if c.alive() or self.stopping.is_set() or c.restarts >= self.max_restarts:
                        continue
                    c.restarts += 1
                    self.say(f"{c.name} exited with {c.returncode}; restarting ({c.restarts}/{self.max_restarts})")
                    c.start()

        self._watcher = threading.Thread(target=loop, name="supervisor-watch", daemon=True)
        self._watcher.start()

    def stop(self, timeout_s: float = 35.0) -> None:
        """SIGTERM every child at once, then wait for all of them; SIGKILL what outlives ``timeout_s``."""
        self.stopping.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for c in self.children:
            c.terminate()
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            c.wait_or_kill(deadline)
