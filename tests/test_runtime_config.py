"""UpdateRuntimeConfig: the pod CIDR kubelet sends becomes the built-in network's
subnet for new pods when the operator set none; it is recorded, survives a
restart, and shows in Status (crictl info)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from conftest import Daemon, run_pod, status

from shim._proto import api_pb2

pytestmark = pytest.mark.root


@pytest.fixture
def unset_daemon(daemon_factory: type[Daemon]) -> Iterator[Daemon]:
    """A daemon without --pod-subnet, in a network namespace of the test's own: the
    default and kubelet's ranges then exist nowhere but there."""
    daemon = daemon_factory(start=False)  # type: ignore[call-arg]
    daemon.netns = f"pst{daemon.tag}"
    subprocess.run(["ip", "netns", "add", daemon.netns], check=True)
    try:
        daemon.pod_subnet = ""
        yield daemon.start()
        daemon.cleanup()
    finally:
        subprocess.run(["ip", "netns", "del", daemon.netns], check=False)


def update(daemon: Daemon, pod_cidr: str) -> None:
    request = api_pb2.UpdateRuntimeConfigRequest(
        runtime_config=api_pb2.RuntimeConfig(network_config=api_pb2.NetworkConfig(pod_cidr=pod_cidr))
    )
    daemon.runtime.UpdateRuntimeConfig(request, timeout=10)


def network(daemon: Daemon) -> dict:  # type: ignore[type-arg]
    response = daemon.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    return json.loads(response.info["info"])["network"]  # type: ignore[no-any-return]


def ip_of(daemon: Daemon, sandbox_id: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(status(daemon, sandbox_id).status.network.ip)


def remove(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    daemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def test_kubelets_pod_cidr_becomes_the_subnet_for_new_pods(unset_daemon: Daemon) -> None:
    d = unset_daemon
    before = network(d)
    assert before["podSubnet"] == "10.88.0.0/16"
    assert before["podCIDR"] == {"fromKubelet": None, "subnetFrom": "default", "pending": None}

    update(d, "10.77.3.0/24,fd00:77::/64")
    after = network(d)
    assert after["podSubnet"] == "10.77.3.0/24"
    assert after["podCIDR"] == {
        "fromKubelet": "10.77.3.0/24,fd00:77::/64",
        "subnetFrom": "kubelet",
        "pending": None,
    }
    first = run_pod(d)
    assert ip_of(d, first) in ipaddress.IPv4Network("10.77.3.0/24")

    # With a pod on the bridge a new range waits: the running pod keeps its gateway.
    update(d, "10.77.4.0/24")
    assert network(d)["podCIDR"]["pending"] == "10.77.4.0/24"
    second = run_pod(d)
    assert ip_of(d, second) in ipaddress.IPv4Network("10.77.3.0/24")
    remove(d, first)
    remove(d, second)
    third = run_pod(d)
    assert ip_of(d, third) in ipaddress.IPv4Network("10.77.4.0/24")
    addresses = subprocess.run(
        ["ip", "-n", d.netns, "-4", "-o", "addr", "show", "dev", d.bridge], capture_output=True, text=True
    ).stdout
    assert "10.77.4.1/24" in addresses and "10.77.3.1" not in addresses

    # Recorded: a restart keeps the range kubelet gave.
    d.restart(kill=False)
    assert network(d)["podSubnet"] == "10.77.4.0/24"
    assert ip_of(d, third) in ipaddress.IPv4Network("10.77.4.0/24")
    remove(d, third)


def test_bad_pod_cidrs_are_invalid_and_change_nothing(unset_daemon: Daemon) -> None:
    for bad in ("nonsense", "10.1.0.0/24,10.2.0.0/24", "10.1.0.0/31", "a" * 300, "10.0.0.0/8,::/64,::/64"):
        with pytest.raises(grpc.RpcError) as err:
            update(unset_daemon, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert network(unset_daemon)["podSubnet"] == "10.88.0.0/16"
    # An IPv6-only range is recorded but leaves the IPv4 subnet as it is; empty is no news.
    update(unset_daemon, "fd00:9::/64")
    update(unset_daemon, "")
    info = network(unset_daemon)
    assert info["podSubnet"] == "10.88.0.0/16"
    assert info["podCIDR"]["fromKubelet"] == "fd00:9::/64"


def test_the_operators_subnet_wins(daemon: Daemon) -> None:
    update(daemon, "10.77.5.0/24")
    info = network(daemon)
    assert info["podSubnet"] == daemon.pod_subnet
    assert info["podCIDR"] == {"fromKubelet": "10.77.5.0/24", "subnetFrom": "--pod-subnet", "pending": None}
    sandbox_id = run_pod(daemon)
    assert ip_of(daemon, sandbox_id) in ipaddress.IPv4Network(daemon.pod_subnet)
