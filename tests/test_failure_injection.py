"""Every named failure point of RunPodSandbox, as an error and as a crash, for
pod-network and host-network pods; every undo of the rollback failing; and random
combinations of these. After each: nothing is left (no pause, pin, veth, record,
run dir, address, host-port map element), or what an undo could not remove is kept
as a NOTREADY sandbox that Stop and Remove finish; and the pod's name is free again.

One daemon serves the whole module, restarted with other --fail-at flags per case.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import grpc
import pytest
from conftest import Daemon, examples, pod_config, run_pod
from hypothesis import event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from leaks import DaemonState, assert_state, daemon_state, sockets_in_other_netns

from shim._proto import api_pb2

pytestmark = pytest.mark.root

STEPS = ("mkdir", "cgroup", "spawn", "pin", "shm", "network", "save", "commit")
NETWORKS = ("pod", "host")
UNDOS = ("cgroup", "close_netlink", "kill_pause", "unpin", "shm", "network", "delete_record")
_next_port = itertools.cycle(range(31000, 32000))  # each case frees its port again
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Pod:
    """What a case asks for."""

    network: str
    pid: int = api_pb2.POD
    ipc: int = api_pb2.POD
    host_port: bool = True

    def config(self) -> api_pb2.PodSandboxConfig:
        config = pod_config(
            network=api_pb2.POD if self.network == "pod" else api_pb2.NODE, pid=self.pid, ipc=self.ipc
        )
        if self.network == "pod" and self.host_port:
            # A map element in the daemon's table: the rollback and the sweep must remove it too.
            config.port_mappings.add(protocol=api_pb2.TCP, container_port=80, host_port=next(_next_port))
        return config

    def pins(self) -> bool:
        return self.network == "pod" or self.ipc == api_pb2.POD or self.pid == api_pb2.POD


def registered_undos(step: str, pod: Pod) -> list[str]:
    """The undo steps registered when `step` fails, in the order they were registered
    (the rollback runs them newest first). Mirrors RunPodSandbox's order of work."""
    done = STEPS[: STEPS.index(step) + 1]
    undos = []
    if "cgroup" in done:
        undos.append("cgroup")
    if "spawn" in done:
        undos += ["close_netlink"] if pod.network == "pod" else []
        undos.append("kill_pause")
    if "pin" in done and pod.pins():
        undos.append("unpin")
    if "shm" in done and pod.ipc == api_pb2.POD:
        undos.append("shm")
    if "network" in done and pod.network == "pod":
        undos.append("network")
    if "commit" in done:
        undos.append("delete_record")
    return undos


# ---- the module's daemon ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(base=tmp_path_factory.mktemp("faults"))
    try:
        yield d.start()
    finally:
        d.cleanup()


@pytest.fixture
def faulty(module_daemon: Daemon) -> Iterator[Daemon]:
    """The module's daemon, serving, without flags and without pods; without flags
    again after the test (whatever it did), so the next one starts clean."""
    reset(module_daemon)
    yield module_daemon
    reset(module_daemon)


def reset(d: Daemon) -> DaemonState:
    if d.proc is None or d.proc.poll() is not None or d.extra_args:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()
        d._close_channel()
        d.start(extra_args=[])
    for pod in d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items:
        remove(d, pod.id)
    return daemon_state(d)


def remove(d: Daemon, sandbox_id: str) -> None:
    d.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def stop(d: Daemon, sandbox_id: str) -> None:
    d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def run_fails(d: Daemon, config: api_pb2.PodSandboxConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        run_pod(d, config)
    return err.value


def listed(d: Daemon) -> list[api_pb2.PodSandbox]:
    return list(d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items)


def crashed(d: Daemon, err: grpc.RpcError) -> None:
    """The daemon killed itself at an injected crash point; start it without flags."""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert d.proc is not None and d.proc.wait(timeout=10) == 70
    d._close_channel()
    d.start(extra_args=[])


def no_stray_sockets(d: Daemon) -> None:
    assert d.proc is not None
    assert sockets_in_other_netns(d.proc.pid) == [], "the daemon holds a socket into a pod's namespace"


def made_once_the_fault_is_gone(d: Daemon, config: api_pb2.PodSandboxConfig, before: DaemonState) -> None:
    assert not d.extra_args
    sandbox_id = run_pod(d, config)
    (pod,) = listed(d)
    assert pod.id == sandbox_id and pod.state == api_pb2.SANDBOX_READY
    remove(d, sandbox_id)
    assert_state(d, before, "after removing the pod made once the fault was gone")


def undo_failures_logged(d: Daemon, sandbox_id: str) -> set[str]:
    return set(re.findall(rf"event=undo_failed sandbox={sandbox_id} step=(\w+)", d.log.read_text()))


# ---- every step x {error, crash} x {pod network, host network} -------------------------------


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("mode", ["error", "crash"])
@pytest.mark.parametrize("step", STEPS)
def test_fault_at_every_step_leaves_nothing(faulty: Daemon, step: str, mode: str, network: str) -> None:
    d = faulty
    before = daemon_state(d)
    config = Pod(network).config()
    d.restart(extra_args=["--fail-at", step if mode == "error" else f"crash:{step}"])
    err = run_fails(d, config)
    if mode == "error":
        assert err.code() == grpc.StatusCode.INTERNAL and f"step {step!r}" in (err.details() or "")
        assert_state(d, before, f"after the rollback of a failure at {step}")
        no_stray_sockets(d)
        # The name was released: a retry reaches the failing step again (it would be
        # ALREADY_EXISTS, or wait for a reservation, if the name were still held).
        err = run_fails(d, config)
        assert err.code() == grpc.StatusCode.INTERNAL and f"step {step!r}" in (err.details() or "")
        assert_state(d, before, "after a retry's rollback")
        d.restart(extra_args=[])
    else:
        crashed(d, err)
        if step == "commit":
            # The record was written before the daemon died: the pod is there and READY,
            # and kubelet's retry with the same metadata gets it.
            (pod,) = listed(d)
            assert pod.state == api_pb2.SANDBOX_READY and pod.metadata.name == config.metadata.name
            assert run_pod(d, config) == pod.id
            remove(d, pod.id)
        assert_state(d, before, f"after the start-up sweep of a crash at {step}")
    made_once_the_fault_is_gone(d, config, before)


# ---- every undo that can run, failing ----------------------------------------------------------

_NODE_PIECES = ("pauses", "mounts", "cgroups", "netns_pins", "veths", "addresses", "host_ports")
_UNDO_CASES = [
    (step, undo, network)
    for network in NETWORKS
    for step in STEPS
    for undo in registered_undos(step, Pod(network))
]


def expected_remains(step: str, undo: str, network: str) -> set[str]:
    """What a failed undo leaves on the node, beyond the NOTREADY record and its run dir."""
    veth = network == "pod" and STEPS.index(step) >= STEPS.index("network")
    if undo == "kill_pause":
        # The cgroup undo that follows ends what is still in the pause's cgroup: the pause too.
        return set()
    if undo == "unpin":
        pieces = {"mounts"}
        if network == "pod":
            pieces.add("netns_pins")
        return pieces | {"veths"} if veth else pieces  # so does a pinned namespace
    if undo == "network":
        return {"addresses", "host_ports"}
    if undo == "cgroup":
        return {"cgroups"}  # the pod's cgroup and the pause's, made for it
    if undo == "shm":
        return {"mounts"}  # the pod's /dev/shm tmpfs
    return set()  # close_netlink: a socket, closed once its last reference goes; delete_record


def changed(before: DaemonState, after: DaemonState) -> set[str]:
    return {name for name in _NODE_PIECES if getattr(before, name) != getattr(after, name)}


def settle_changes(d: Daemon, before: DaemonState, expected: set[str]) -> DaemonState:
    """The state once exactly `expected` node pieces differ from `before` (a veth goes
    with its namespace in the kernel's background), or after a few seconds."""
    deadline = time.monotonic() + 5
    while True:
        state = daemon_state(d)
        if changed(before, state) == expected or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


@pytest.mark.parametrize(("step", "undo", "network"), _UNDO_CASES, ids=["-".join(c) for c in _UNDO_CASES])
def test_failed_undo_keeps_a_notready_sandbox_that_stop_and_remove_finish(
    faulty: Daemon, step: str, undo: str, network: str
) -> None:
    d = faulty
    before = daemon_state(d)
    config = Pod(network).config()
    d.restart(extra_args=["--fail-at", step, "--fail-at", f"undo:{undo}"])
    err = run_fails(d, config)
    assert err.code() == grpc.StatusCode.INTERNAL and f"step {step!r}" in (err.details() or "")
    (pod,) = listed(d)
    assert pod.state == api_pb2.SANDBOX_NOTREADY and pod.metadata.name == config.metadata.name
    assert undo_failures_logged(d, pod.id) == {undo}
    # Exactly what the failed undo should have removed is left, and recorded.
    expected = expected_remains(step, undo, network)
    remains = settle_changes(d, before, expected)
    assert changed(before, remains) == expected, before.diff(remains)
    assert remains.records == before.records | {f"{pod.id}.json"}
    assert remains.run_dirs == before.run_dirs | {pod.id}
    # The name stays taken until the remains are removed, also across a restart.
    err = run_fails(d, config)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and pod.id in (err.details() or "")
    d.restart(extra_args=[])
    (again,) = listed(d)
    assert (again.id, again.state) == (pod.id, api_pb2.SANDBOX_NOTREADY)
    err = run_fails(d, config)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    # Stop releases what is left on the node; Remove deletes the record and the run dir.
    stop(d, pod.id)
    stopped = replace(
        before,
        records=remains.records,
        run_dirs=remains.run_dirs,
        # Stop removes the pause's cgroup; the pod's own goes with Remove.
        cgroups=frozenset(c for c in remains.cgroups if not c.endswith(f"/pyshim-{pod.id}")),
        listed=((pod.id, api_pb2.SANDBOX_NOTREADY), *before.listed),
    )
    assert_state(d, stopped, f"after stopping the remains of a failed undo:{undo}")
    remove(d, pod.id)
    assert_state(d, before, f"after removing the remains of a failed undo:{undo}")
    no_stray_sockets(d)
    made_once_the_fault_is_gone(d, config, before)


def pinned_if_ready(d: Daemon, sandbox_id: str) -> None:
    """READY means the pause runs and every namespace is pinned (a mount at its path)."""
    reply = d.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10
    )
    if reply.status.state == api_pb2.SANDBOX_READY:
        paths = list(json.loads(reply.info["info"])["namespaces"].values())  # none: all the node's
        assert all(os.path.ismount(p) for p in paths), f"READY without its pins: {paths}"


@pytest.mark.parametrize("network", NETWORKS)
def test_a_rollback_that_dies_after_its_record_could_not_be_deleted(faulty: Daemon, network: str) -> None:
    """Two faults: the record (READY) cannot be deleted, then the daemon dies while
    undoing the rest, after the pins went but before the pause did. On restart the
    pause lives but its namespaces are gone: NOTREADY, not READY, and Stop/Remove
    finish it."""
    d = faulty
    before = daemon_state(d)
    config = Pod(network).config()
    d.restart(
        extra_args=[
            "--fail-at",
            "commit",
            "--fail-at",
            "undo:delete_record",
            "--fail-at",
            "crash:undo:kill_pause",
        ]
    )
    crashed(d, run_fails(d, config))
    (pod,) = listed(d)
    assert pod.state == api_pb2.SANDBOX_NOTREADY
    pinned_if_ready(d, pod.id)
    remove(d, pod.id)
    assert_state(d, before, "after removing what the two faults left")
    made_once_the_fault_is_gone(d, config, before)


# ---- random combinations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    step: str
    crash: bool
    pod: Pod
    # Undo steps made to fail ("undo:NAME") or to kill the daemon ("crash:undo:NAME").
    undo_faults: dict[str, str] = field(default_factory=dict)

    def flags(self) -> list[str]:
        flags = ["--fail-at", f"crash:{self.step}" if self.crash else self.step]
        for name, kind in sorted(self.undo_faults.items()):
            flags += ["--fail-at", f"undo:{name}" if kind == "fail" else f"crash:undo:{name}"]
        return flags

    def expect(self) -> tuple[bool, bool, set[str]]:
        """(the daemon dies, a record is on disk when it does or after the rollback,
        the undos that fail): the rollback runs the registered undos newest first and
        goes on after a failed one."""
        record = self.step == "commit"  # written before the fault
        if self.crash:
            return True, record, set()
        failed: set[str] = set()
        for name in reversed(registered_undos(self.step, self.pod)):
            kind = self.undo_faults.get(name)
            if kind == "crash":
                return True, record, failed
            if kind == "fail":
                failed.add(name)
            elif name == "delete_record":
                record = False
        return False, record or bool(failed), failed


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    network = draw(st.sampled_from(NETWORKS))
    pod = Pod(
        network=network,
        pid=draw(st.sampled_from([api_pb2.POD, api_pb2.CONTAINER, api_pb2.NODE])),
        ipc=draw(st.sampled_from([api_pb2.POD, api_pb2.NODE])),
        host_port=draw(st.booleans()),
    )
    faults = draw(
        st.dictionaries(st.sampled_from(UNDOS), st.sampled_from(["fail", "fail", "crash"]), max_size=3)
    )
    crash = draw(st.sampled_from([False, False, True]))
    return Scenario(step=draw(st.sampled_from(STEPS)), crash=crash, pod=pod, undo_faults=faults)


@pytest.mark.fuzz
@given(scenario=scenarios())
@hsettings(max_examples=examples(10, long_share=0.05))  # each example restarts the daemon 2-3 times
def test_random_fault_combinations_leave_nothing_or_finishable_remains(
    module_daemon: Daemon, scenario: Scenario
) -> None:
    d = module_daemon
    before = reset(d)
    try:
        config = scenario.pod.config()
        dies, record, failed = scenario.expect()
        event("daemon dies" if dies else "undo fails" if failed else "rolled back")
        event("a record survives" if record else "no record")
        d.restart(extra_args=scenario.flags())
        err = run_fails(d, config)
        if dies:
            crashed(d, err)
        else:
            assert err.code() == grpc.StatusCode.INTERNAL and f"step {scenario.step!r}" in (
                err.details() or ""
            )
        pods = listed(d)
        if not record:
            # Rolled back, or swept on start: nothing is left.
            assert_state(d, before, f"after {scenario}")
            if not dies:
                no_stray_sockets(d)
        else:
            (pod,) = pods
            assert pod.metadata.name == config.metadata.name
            pinned_if_ready(d, pod.id)
            if not dies:
                assert pod.state == api_pb2.SANDBOX_NOTREADY
                assert undo_failures_logged(d, pod.id) == failed
            if pod.state == api_pb2.SANDBOX_READY:
                assert run_pod(d, config) == pod.id  # kubelet's retry gets the pod
            else:
                assert run_fails(d, config).code() == grpc.StatusCode.ALREADY_EXISTS
            stop(d, pod.id)
            remove(d, pod.id)
            assert_state(d, before, f"after removing what {scenario} left")
        reset(d)
        made_once_the_fault_is_gone(d, config, before)
    except BaseException:
        reset(d)  # leave nothing behind for the next example, nor for the leak check
        raise


def test_every_step_of_run_is_in_the_matrix() -> None:
    """The steps `pyshim serve --help` names for RunPodSandbox are exactly STEPS: a new
    step must join the matrix (and registered_undos, expected_remains, leaks.py)."""
    from shim.cli import _parser

    serve = next(a for a in _parser()._actions if a.dest == "command").choices["serve"]  # type: ignore[attr-defined]
    text = " ".join(next(a.help for a in serve._actions if a.dest == "fail_at").split())
    found = re.search(r"RunPodSandbox: ([a-z, -]+?)[;)]", text)
    assert found is not None, text
    assert tuple(step.strip() for step in found.group(1).split(",")) == STEPS


def test_the_fault_points_are_where_this_module_thinks(faulty: Daemon) -> None:
    """The model above (registered_undos) must follow the code: with every undo made
    to fail at the last step, the log names exactly the undos the model expects."""
    d = faulty
    before = daemon_state(d)
    every_undo = [flag for undo in UNDOS for flag in ("--fail-at", f"undo:{undo}")]
    for network in NETWORKS:
        pod = Pod(network)
        d.restart(extra_args=["--fail-at", "commit", *every_undo])
        run_fails(d, pod.config())
        (left,) = listed(d)
        assert undo_failures_logged(d, left.id) == set(registered_undos("commit", pod))
        remove(d, left.id)
        assert_state(d, before, f"after removing what every failed undo left ({network} network)")


def test_the_stray_socket_check_sees_a_socket_in_a_pod_namespace(faulty: Daemon) -> None:
    """no_stray_sockets must be able to fail: a socket this process opens inside a
    pod's network namespace (from a thread that enters it) is found."""
    d = faulty
    sandbox_id = run_pod(d)
    pin = d.netns_dir / f"pyshim-{sandbox_id}"
    made: list[socket.socket] = []

    def open_inside() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(pin, os.O_RDONLY)
        try:
            assert libc.setns(target, _CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            made.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            assert libc.setns(home, _CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(home)
            os.close(target)

    thread = threading.Thread(target=open_inside)
    thread.start()
    thread.join()
    try:
        assert sockets_in_other_netns(os.getpid()) == [made[0].fileno()]
    finally:
        made[0].close()
        remove(d, sandbox_id)
    assert sockets_in_other_netns(os.getpid()) == []
