"""State that survives the daemon: kill -9 and restart, pauses dying on their
own. (A daemon that dies in the middle of RunPodSandbox: test_failure_injection.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Daemon, pause_pids, pod_config, run_pod, status

from shim._proto import api_pb2

pytestmark = pytest.mark.root


def details(daemon: Daemon, sandbox_id: str) -> dict:  # type: ignore[type-arg]
    return json.loads(status(daemon, sandbox_id, verbose=True).info["info"])


def wait_state(daemon: Daemon, sandbox_id: str, state: int, seconds: float = 10) -> int:
    deadline = time.monotonic() + seconds
    while True:
        got = status(daemon, sandbox_id).status.state
        if got == state or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_kill9_and_restart_keeps_pods_running_and_known(daemon: Daemon) -> None:
    config = pod_config(labels={"keep": "me"}, pid=api_pb2.POD, hostname="survivor")
    sandbox_id = run_pod(daemon, config)
    stopped_id = run_pod(daemon)
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=stopped_id), timeout=30)
    before = details(daemon, sandbox_id)

    daemon.kill9()
    assert before["pid"] in pause_pids()
    daemon.start()

    after = details(daemon, sandbox_id)
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_READY
    assert (after["pid"], after["namespaces"], after["pauseStartTime"]) == (
        before["pid"],
        before["namespaces"],
        before["pauseStartTime"],
    )
    assert status(daemon, stopped_id).status.state == api_pb2.SANDBOX_NOTREADY
    assert dict(status(daemon, sandbox_id).status.labels) == {"keep": "me"}
    # The name is still reserved: a retry gets the same sandbox.
    assert run_pod(daemon, config) == sandbox_id
    # And the re-adopted pause is still watched: its death is noticed.
    os.kill(before["pid"], signal.SIGKILL)
    assert wait_state(daemon, sandbox_id, api_pb2.SANDBOX_NOTREADY) == api_pb2.SANDBOX_NOTREADY


def test_graceful_sigterm_keeps_pods_and_removes_socket(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    pid = details(daemon, sandbox_id)["pid"]
    assert daemon.terminate() == 0
    assert not daemon.socket.exists()
    assert pid in pause_pids()
    daemon.start()
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_READY


def test_pause_killed_from_outside_turns_notready(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, pid=api_pb2.POD)
    info = details(daemon, sandbox_id)
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_state(daemon, sandbox_id, api_pb2.SANDBOX_NOTREADY) == api_pb2.SANDBOX_NOTREADY
    (item,) = daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert item.state == api_pb2.SANDBOX_NOTREADY
    # Stop still releases the pins the dead pause left.
    assert all(Path(p).exists() for p in info["namespaces"].values())
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    assert not any(Path(p).exists() for p in info["namespaces"].values())


def test_pause_that_died_while_daemon_was_down_is_notready(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    pid = details(daemon, sandbox_id)["pid"]
    daemon.kill9()
    os.kill(pid, signal.SIGKILL)
    daemon.start()
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY


def test_reused_pid_is_not_mistaken_for_the_pause(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    daemon.kill9()
    record_path = daemon.root / "sandboxes" / f"{sandbox_id}.json"
    record = json.loads(record_path.read_text())
    # Same pid, another start time: as if the pid had been reused after a crash.
    record["pause"]["start_time"] += 1
    record_path.write_text(json.dumps(record))
    daemon.start()
    assert status(daemon, sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY
    # The real pause is never signalled by its pid, which the record no longer matches;
    # but it is in the pod's cgroup, where only the pod's processes ever are: Remove ends it.
    pid = record["pause"]["pid"]
    assert pid in pause_pids()
    daemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    assert pid not in pause_pids()


def _damage(record: dict, how: str) -> None:  # type: ignore[type-arg]
    if how == "future version":
        record["version"] = 99  # written by a newer pyshim, say
    elif how == "label not a string":
        record["labels"]["keep"] = None  # was loaded, then failed every ListPodSandbox as INTERNAL
    elif how == "created_at Infinity":
        record["created_at"] = float("inf")  # was an OverflowError that stopped the daemon's start
    elif how == "pid out of range":
        record["pause"]["pid"] = 2**70
    else:
        record["config"] = "AAAA"  # base64 of bytes that are no PodSandboxConfig


@pytest.mark.parametrize(
    "how", ["future version", "label not a string", "created_at Infinity", "pid out of range", "bad config"]
)
def test_record_that_cannot_be_loaded_is_left_alone(daemon: Daemon, how: str) -> None:
    sandbox_id = run_pod(daemon, labels={"keep": "me"})
    info = details(daemon, sandbox_id)
    daemon.kill9()
    record_path = daemon.root / "sandboxes" / f"{sandbox_id}.json"
    record = json.loads(record_path.read_text())
    _damage(record, how)
    record_path.write_text(json.dumps(record))
    daemon.start()
    # Not managed (so not listed), but neither killed nor unpinned nor deleted.
    assert daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    assert info["pid"] in pause_pids()
    assert all(Path(p).exists() for p in info["namespaces"].values())
    assert record_path.exists()
    assert "record_refused" in daemon.log.read_text()
