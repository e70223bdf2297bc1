"""Containers that join their pod, on runc and crun under conmon: namespaces,
lifecycle, logs, exits, stop escalation, ExecSync, and what a pod's removal leaves
(nothing)."""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cgrouptools import cgroups_under
from conftest import Daemon, conmon_pids, mounts_under, pod_config
from containertools import (
    IMAGE,
    container_config,
    create,
    exec_sync,
    import_image,
    info,
    run,
    start,
    status,
    wait_state,
)

from shim._proto import api_pb2
from shim.procs import chrooted

pytestmark = pytest.mark.root

RUNTIMES = ("runc", "crun")

# In a chroot (../shared/tools/fresh-machine.sh runs the suite in one) the runtimes' exec
# lands in the real root directory, not the container's: the daemon warns of it at start.
EXEC_SEES_THE_CONTAINER = pytest.mark.skipif(
    chrooted(), reason="in a chroot, an OCI runtime's exec sees the node's root, not the container's"
)


@pytest.fixture(params=RUNTIMES)
def handler(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pod(daemon: Daemon, handler: str, **kwargs: object) -> tuple[str, api_pb2.PodSandboxConfig]:
    config = pod_config(**kwargs)  # type: ignore[arg-type]
    config.log_directory = str(daemon.base / "logs" / config.metadata.name)
    request = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return daemon.runtime.RunPodSandbox(request, timeout=30).pod_sandbox_id, config


def pod_info(daemon: Daemon, sandbox_id: str) -> dict:  # type: ignore[type-arg]
    response = daemon.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10
    )
    return json.loads(response.info["info"])  # type: ignore[no-any-return]


def pid_of(daemon: Daemon, container_id: str) -> int:
    return int(info(daemon, container_id)["pid"])


@EXEC_SEES_THE_CONTAINER
def test_containers_join_the_pods_namespaces(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler, hostname="web-0", pid=api_pb2.POD)
    pause = pod_info(cdaemon, sandbox_id)
    server = run(
        cdaemon, sandbox_id, container_config("server", ["nc", "-l", "-p", "8080", "-e", "echo", "hi"])
    )
    client = run(cdaemon, sandbox_id, container_config("client"))
    for container_id in (server, client):
        pid = pid_of(cdaemon, container_id)
        for kind in ("net", "ipc", "uts", "pid"):
            assert os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(pause["namespaces"][kind]).st_ino, kind
        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat(f"/proc/{pause['pid']}/ns/mnt").st_ino
    # localhost is the pod's: the client reaches the server's port on 127.0.0.1.
    deadline = time.monotonic() + 10
    while True:
        answer = exec_sync(cdaemon, client, "nc", "127.0.0.1", "8080", timeout=5)
        if answer.stdout == b"hi\n" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer.stdout == b"hi\n"
    assert exec_sync(cdaemon, client, "hostname").stdout == b"web-0\n"
    # POD pid mode: the pause is PID 1 of the containers' pid namespace.
    assert exec_sync(cdaemon, client, "cat", "/proc/1/comm").stdout == b"pyshim-pause\n"
    ip = cdaemon.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=10
    ).status.network.ip
    assert ip.encode() in exec_sync(cdaemon, client, "ip", "-o", "-4", "addr", "show", "eth0").stdout


@EXEC_SEES_THE_CONTAINER
def test_container_pid_mode_has_its_own_pid_namespace(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler, pid=api_pb2.CONTAINER)
    container_id = run(cdaemon, sandbox_id, container_config("own", ["sleep", "3600"]))
    assert exec_sync(cdaemon, container_id, "cat", "/proc/1/comm").stdout == b"sleep\n"
    pid = pid_of(cdaemon, container_id)
    assert os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino


def test_lifecycle_states_and_status(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, pod_cfg = pod(cdaemon, handler)
    config = container_config("app", ["sh", "-c", "echo out; echo err >&2; exit 3"], labels={"tier": "a"})
    container_id = create(cdaemon, sandbox_id, config, pod_cfg)
    st = status(cdaemon, container_id).status
    assert st.state == api_pb2.CONTAINER_CREATED and st.created_at > 0 and st.started_at == 0
    assert st.metadata.name == "app" and dict(st.labels) == {"tier": "a"} and st.image.image == IMAGE
    assert st.image_id.startswith("sha256:") and st.log_path.endswith("app/0.log")
    start(cdaemon, container_id)
    st = wait_state(cdaemon, container_id, api_pb2.CONTAINER_EXITED)
    assert st.state == api_pb2.CONTAINER_EXITED and st.exit_code == 3 and st.reason == "Error"
    assert st.started_at >= st.created_at and st.finished_at >= st.started_at
    log_lines = Path(st.log_path).read_text().splitlines()
    assert {tuple(line.split(" ", 3)[1:]) for line in log_lines} == {
        ("stdout", "F", "out"),
        ("stderr", "F", "err"),
    }
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+[+-]\d\d:\d\d", line.split()[0])
        for line in log_lines
    )
    listed = cdaemon.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    assert [c.id for c in listed] == [container_id]
    done = run(cdaemon, sandbox_id, container_config("done", ["true"]))
    assert wait_state(cdaemon, done, api_pb2.CONTAINER_EXITED).reason == "Completed"
    for flt, expected in (
        (api_pb2.ContainerFilter(id=container_id[:10]), [container_id]),
        (api_pb2.ContainerFilter(pod_sandbox_id=sandbox_id[:10]), [done, container_id]),
        (api_pb2.ContainerFilter(label_selector={"tier": "a"}), [container_id]),
        (api_pb2.ContainerFilter(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)), []),
        (api_pb2.ContainerFilter(pod_sandbox_id="f" * 64), []),
    ):
        found = cdaemon.runtime.ListContainers(api_pb2.ListContainersRequest(filter=flt), timeout=10)
        assert sorted(c.id for c in found.containers) == sorted(expected)
    details = info(cdaemon, container_id)
    assert details["sandboxID"] == sandbox_id and details["runtime"]["kind"] == handler
    assert details["runtimeSpec"]["process"]["args"] == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert "hostname" not in details["runtimeSpec"]


def test_duplicate_names_and_bad_targets_are_refused(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler)
    first = create(cdaemon, sandbox_id, container_config("dup"))
    with pytest.raises(grpc.RpcError) as err:
        create(cdaemon, sandbox_id, container_config("dup"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and first in (err.value.details() or "")
    assert create(cdaemon, sandbox_id, container_config("dup", attempt=1))
    for pod_id, config, code in (
        ("a" * 64, container_config("x"), grpc.StatusCode.NOT_FOUND),
        (sandbox_id, container_config("x", image="pyshim.test/missing:1"), grpc.StatusCode.NOT_FOUND),
        (sandbox_id, container_config("x", log_path="../../escape.log"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            create(cdaemon, pod_id, config)
        assert err.value.code() == code, err.value.details()
    cdaemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        create(cdaemon, sandbox_id, container_config("late"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stop_escalates_to_sigkill(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler, pid=api_pb2.CONTAINER)
    stubborn = run(
        cdaemon,
        sandbox_id,
        container_config("stubborn", ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]),
    )
    polite = run(
        cdaemon, sandbox_id, container_config("polite", ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"])
    )
    time.sleep(0.3)  # the shells have set their traps
    begin = time.monotonic()
    cdaemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=stubborn, timeout=1), timeout=30)
    assert time.monotonic() - begin >= 1.0
    st = status(cdaemon, stubborn).status
    assert st.state == api_pb2.CONTAINER_EXITED and st.exit_code == 137
    cdaemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=polite, timeout=30), timeout=60)
    assert status(cdaemon, polite).status.exit_code == 0
    # Idempotent, also for unknown ids.
    cdaemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=stubborn, timeout=1), timeout=30)
    cdaemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id="b" * 64), timeout=30)
    cdaemon.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id="b" * 64), timeout=30)


def test_oom_kill_is_reported(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler)
    config = container_config("hog", ["sh", "-c", "x=a; while :; do x=$x$x$x$x; done"])
    config.linux.resources.memory_limit_in_bytes = 32 * 1024 * 1024
    container_id = run(cdaemon, sandbox_id, config)
    st = wait_state(cdaemon, container_id, api_pb2.CONTAINER_EXITED, timeout=60)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 137, "OOMKilled")


@EXEC_SEES_THE_CONTAINER
def test_exec_sync(cdaemon: Daemon, handler: str) -> None:
    # A shared pid namespace: the pause (PID 1) reaps what a killed command orphans, as
    # no init in a container of its own would (sleep 3600 here).
    sandbox_id, _ = pod(cdaemon, handler, pid=api_pb2.POD)
    container_id = run(
        cdaemon, sandbox_id, container_config("box", ["sleep", "3600"], envs={"GREETING": "hello"})
    )
    result = exec_sync(cdaemon, container_id, "sh", "-c", "echo $GREETING; echo oops >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"hello\n", b"oops\n", 3)
    begin = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        exec_sync(cdaemon, container_id, "sh", "-c", "sleep 60 & sleep 60", timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - begin < 10
    # Nothing of the command is left, not even a zombie (pgrep would still find one).
    left = exec_sync(cdaemon, container_id, "ps", "-o", "args").stdout.decode().splitlines()
    assert [line for line in left if "sleep" in line] == ["sleep 3600"]
    with pytest.raises(grpc.RpcError) as err:
        exec_sync(cdaemon, container_id, "sh", "-c", "yes | head -c 20000000")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "stdout" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        exec_sync(cdaemon, "c" * 64, "true")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The pod still stops at once: no dead command pins its pid namespace.
    cdaemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


@EXEC_SEES_THE_CONTAINER
def test_exec_timeout_leaves_no_zombie_in_a_pid_namespace_of_its_own(cdaemon: Daemon, handler: str) -> None:
    """critest's case: the runtime's client must live to reap the command it started."""
    sandbox_id, _ = pod(cdaemon, handler, pid=api_pb2.CONTAINER)
    container_id = run(cdaemon, sandbox_id, container_config("box", ["sleep", "3600"]))
    with pytest.raises(grpc.RpcError) as err:
        exec_sync(cdaemon, container_id, "sleep", "4321", timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    left = exec_sync(cdaemon, container_id, "ps", "-o", "args").stdout.decode().splitlines()
    assert [line for line in left if "sleep" in line] == ["sleep 3600"]
    begin = time.monotonic()
    cdaemon.runtime.StopContainer(
        api_pb2.StopContainerRequest(container_id=container_id, timeout=0), timeout=30
    )
    assert time.monotonic() - begin < 5


def test_exec_runs_with_the_containers_user_and_settings(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler)
    config = container_config("user")
    sc = config.linux.security_context
    sc.run_as_user.value = 1000
    sc.supplemental_groups.append(1234)
    sc.no_new_privs = True
    config.working_dir = "/tmp"
    container_id = run(cdaemon, sandbox_id, config)
    result = exec_sync(
        cdaemon, container_id, "sh", "-c", "id -u; id -G; pwd; grep NoNewPrivs /proc/self/status"
    )
    uid, groups, cwd, nnp = result.stdout.decode().splitlines()
    assert (uid, cwd) == ("1000", "/tmp") and "1234" in groups.split() and nnp.split()[-1] == "1"


def test_logs_are_cri_formatted_and_reopened_after_rotation(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler)
    script = "head -c 20000 /dev/zero | tr '\\0' x; echo; echo short; while :; do echo tick; sleep 0.1; done"
    container_id = run(cdaemon, sandbox_id, container_config("talker", ["sh", "-c", script]))
    log_path = Path(status(cdaemon, container_id).status.log_path)
    deadline = time.monotonic() + 10
    while (
        b"tick" not in (log_path.read_bytes() if log_path.exists() else b"") and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    lines = log_path.read_text().splitlines()
    tags = [line.split(" ", 3)[2] for line in lines]
    long_pieces = [line.split(" ", 3)[3] for line in lines[: tags.index("F") + 1]]
    assert tags[0] == "P" and "".join(long_pieces) == "x" * 20000  # split into partial lines
    assert lines[tags.index("F") + 1].endswith("stdout F short")
    rotated = log_path.with_suffix(".1")
    log_path.rename(rotated)
    cdaemon.runtime.ReopenContainerLog(
        api_pb2.ReopenContainerLogRequest(container_id=container_id), timeout=10
    )
    assert log_path.exists()  # reopened by the time the call returns
    deadline = time.monotonic() + 10
    while not (log_path.exists() and b"tick" in log_path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"tick" in log_path.read_bytes()


def test_restart_recovers_containers_and_exits_while_down(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler)
    stays = run(cdaemon, sandbox_id, container_config("stays"))
    ends = run(cdaemon, sandbox_id, container_config("ends", ["sh", "-c", "sleep 1.5; exit 7"]))
    created = create(cdaemon, sandbox_id, container_config("created"))
    pid = pid_of(cdaemon, stays)
    cdaemon.kill9()
    time.sleep(2.5)  # `ends` exits while no daemon runs
    cdaemon.start()
    assert status(cdaemon, stays).status.state == api_pb2.CONTAINER_RUNNING and pid_of(cdaemon, stays) == pid
    st = status(cdaemon, ends).status
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 7, "Error")
    assert st.finished_at - st.started_at >= 1_400_000_000
    assert status(cdaemon, created).status.state == api_pb2.CONTAINER_CREATED
    start(cdaemon, created)
    assert status(cdaemon, created).status.state == api_pb2.CONTAINER_RUNNING
    cdaemon.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=stays, timeout=0), timeout=30)
    assert status(cdaemon, stays).status.exit_code == 137


def test_removing_a_pod_with_running_containers_leaves_nothing(cdaemon: Daemon, handler: str) -> None:
    sandbox_id, _ = pod(cdaemon, handler, pid=api_pb2.POD)
    ids = [run(cdaemon, sandbox_id, container_config(f"c{n}")) for n in range(3)]
    pids = [pid_of(cdaemon, i) for i in ids]
    assert mounts_under(cdaemon.root) != [] and cgroups_under(cdaemon.cgroup_root) != []
    cdaemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert cdaemon.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    assert mounts_under(cdaemon.base) == []
    assert [d for d in cgroups_under(cdaemon.cgroup_root) if not d.endswith(cdaemon.cgroup_root)] == []
    assert list((cdaemon.run_root / "containers").iterdir()) == []
    assert list((cdaemon.root / "containers").iterdir()) == []
    assert not any(str(cdaemon.base) in _cmdline(p) for p in conmon_pids())


@pytest.mark.parametrize("step", [f"container-{s}" for s in ("mkdir", "rootfs", "spec", "create", "save")])
def test_failure_at_each_create_step_leaves_nothing(
    daemon_factory: type[Daemon], busybox: Path, step: str
) -> None:
    d = daemon_factory(extra_args=["--fail-at", step])  # type: ignore[call-arg]
    import_image(d, busybox)
    sandbox_id, _ = pod(d, "runc")
    with pytest.raises(grpc.RpcError) as err:
        create(d, sandbox_id, container_config("x"))
    assert err.value.code() == grpc.StatusCode.INTERNAL and step in (err.value.details() or "")
    assert d.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    assert [m for m in mounts_under(d.base) if m[1] == "overlay"] == []
    assert list((d.run_root / "containers").iterdir()) == []
    assert list((d.root / "containers").iterdir()) == []
    leaves = {c.rsplit("/", 1)[-1] for c in cgroups_under(d.cgroup_root) if not c.endswith(d.cgroup_root)}
    assert {leaf for leaf in leaves if leaf.startswith("pyshim-")} == {f"pyshim-{sandbox_id}"}  # the pause's
    # The name is free again: the same container can be made once the fault is gone.
    d.restart(kill=False, extra_args=[])
    assert run(d, sandbox_id, container_config("x"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("step", [f"container-{s}" for s in ("rootfs", "spec", "create", "save")])
def test_a_create_the_daemon_died_in_is_swept_on_restart(
    daemon_factory: type[Daemon], busybox: Path, step: str
) -> None:
    d = daemon_factory(extra_args=["--fail-at", f"crash:{step}"])  # type: ignore[call-arg]
    import_image(d, busybox)
    sandbox_id, _ = pod(d, "crun")
    with pytest.raises(grpc.RpcError) as err:
        create(d, sandbox_id, container_config("x"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert d.proc is not None and d.proc.wait(timeout=10) == 70
    d.start(extra_args=[])
    assert d.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers == []
    assert [m for m in mounts_under(d.base) if m[1] == "overlay"] == []
    assert list((d.run_root / "containers").iterdir()) == []
    assert not any(str(d.base) in _cmdline(p) for p in conmon_pids())
    leaves = {c.rsplit("/", 1)[-1] for c in cgroups_under(d.cgroup_root) if not c.endswith(d.cgroup_root)}
    assert {leaf for leaf in leaves if leaf.startswith("pyshim-")} == {f"pyshim-{sandbox_id}"}
    assert run(d, sandbox_id, container_config("x"))  # the name was never taken


def test_a_failed_start_is_an_exited_container(daemon_factory: type[Daemon], busybox: Path) -> None:
    d = daemon_factory(extra_args=["--fail-at", "container-start"])  # type: ignore[call-arg]
    import_image(d, busybox)
    sandbox_id, _ = pod(d, "crun")
    container_id = create(d, sandbox_id, container_config("x"))
    with pytest.raises(grpc.RpcError) as err:
        start(d, container_id)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    st = wait_state(d, container_id, api_pb2.CONTAINER_EXITED)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 128, "StartError")
    d.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id), timeout=30)


def test_stopping_a_pod_stops_its_containers_within_the_callers_deadline(cdaemon: Daemon) -> None:
    """Each running container gets the stop signal and a grace period (10 s, or what
    the caller's deadline leaves, all at once) before its pause goes."""
    sandbox_id, _ = pod(cdaemon, "crun", pid=api_pb2.POD)
    polite = run(cdaemon, sandbox_id, container_config("polite"))
    stubborn = run(
        cdaemon, sandbox_id, container_config("stubborn", ["sh", "-c", "trap '' TERM; sleep 3600"])
    )
    time.sleep(0.3)
    begin = time.monotonic()
    cdaemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=5)
    took = time.monotonic() - begin
    assert 2.5 <= took < 5  # the stubborn one waited out the grace (5 s less the margin), together
    assert status(cdaemon, polite).status.exit_code == 0  # SIGTERM, handled: a clean exit
    assert status(cdaemon, stubborn).status.exit_code == 137


def test_stopping_a_pod_does_not_wait_out_another_calls_grace_period(cdaemon: Daemon) -> None:
    """kubelet's StopContainer with 30 s of grace may be running when StopPodSandbox
    comes: the pod's stop kills at its own deadline, and both calls then return."""
    sandbox_id, _ = pod(cdaemon, "crun", pid=api_pb2.POD)
    stubborn = run(
        cdaemon, sandbox_id, container_config("stubborn", ["sh", "-c", "trap '' TERM; sleep 3600"])
    )
    time.sleep(0.3)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            cdaemon.runtime.StopContainer,
            api_pb2.StopContainerRequest(container_id=stubborn, timeout=120),
            timeout=150,
        )
        time.sleep(0.5)
        # Before the fix this waited for the first call's 120 s and ran out of deadline.
        cdaemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=20)
        first.result()
    assert status(cdaemon, stubborn).status.exit_code == 137


def test_status_names_the_image_even_when_created_by_id(cdaemon: Daemon) -> None:
    sandbox_id, _ = pod(cdaemon, "crun")
    image_id = cdaemon.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=IMAGE)), timeout=10
    ).image.id
    by_id = run(cdaemon, sandbox_id, container_config("byid", image=image_id))  # as kubelet sends it
    st = status(cdaemon, by_id).status
    assert (st.image.image, st.image_id) == (IMAGE, image_id)
    asked = container_config("asked", image=image_id)
    asked.image.user_specified_image = "busybox:1"
    st = status(cdaemon, run(cdaemon, sandbox_id, asked)).status
    assert st.image.image == "busybox:1"
