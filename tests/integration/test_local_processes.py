"""The one-machine supervisor (gpufleet.local.processes) on real child processes: ready, restart, stop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gpufleet.local.processes import Process, ProcessExited, Supervisor, free_port, http_ok, wait_until

pytestmark = pytest.mark.integration


def _static_server(tmp_path: Path, name: str) -> Process:
    """A real HTTP server whose /ready answers 200 (a file of that name in the folder it serves)."""
    root = tmp_path / name
    root.mkdir()
    (root / "ready").write_text("ok")
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    return Process(name, argv, {}, tmp_path / f"{name}.log", url=f"http://127.0.0.1:{port}")


def test_supervisor_restarts_a_child_that_dies_and_stops_them_all(tmp_path: Path) -> None:
    said: list[str] = []
    children = [_static_server(tmp_path, "a"), _static_server(tmp_path, "b")]
    supervisor = Supervisor(children, max_restarts=1, say=said.append)
    try:
        supervisor.start()
        supervisor.wait_ready(30)
        assert "[2/2] b ready" in " ".join(said) or "[2/2] a ready" in " ".join(said)
        assert not http_ok(children[0].url + "/not-here")  # an answer other than 200 is not ready
        supervisor.watch(interval_s=0.1)
        first_pid = children[0].pid
        children[0].popen.kill()  # type: ignore[union-attr]
        wait_until(lambda: children[0].alive() and children[0].pid != first_pid, 10, "a restarted")
        wait_until(lambda: children[0].ready(), 10, "a ready again")
        assert children[0].restarts == 1 and any("a exited with -9; restarting (1/1)" in m for m in said)

        children[0].popen.kill()  # type: ignore[union-attr]
        children[0].popen.wait(5)  # type: ignore[union-attr]
        # Out of restarts: it stays down while the other keeps serving.
        wait_until(lambda: children[1].ready(), 5, "b still serving")
        assert not children[0].alive()
    finally:
        supervisor.stop(timeout_s=10)
    assert not any(c.alive() for c in children)


def test_a_child_that_exits_during_start_up_is_reported_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('bad config here'); sys.exit(3)"
    child = Process("broken", [sys.executable, "-c", code], {}, tmp_path / "broken.log", url="http://127.0.0.1:9")
    supervisor = Supervisor([child], max_restarts=0)
    supervisor.start()
    try:
        with pytest.raises(ProcessExited, match=r"broken exited with 3(.|\n)*bad config here"):
            supervisor.wait_ready(30)
    finally:
        supervisor.stop(timeout_s=5)


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    child = Process("stubborn", [sys.executable, "-c", code], {}, tmp_path / "stubborn.log").start()
    wait_until(lambda: "up" in child.log_tail(), 10, "child running")
    child.stop(timeout_s=0.5)
    assert child.returncode == -9


def test_nothing_listening_is_not_ready() -> None:
    assert not http_ok(f"http://127.0.0.1:{free_port()}/ready", timeout_s=1.0)
