"""The built-in pod network: addresses, reachability between pods, release on
Stop, concurrency, crash recovery of the IPAM, DNS and host files. All traffic
stays between network namespaces these tests made."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import Daemon, pause_pids, pod_config, run_pod, status, veth_names

from shim._proto import api_pb2

pytestmark = pytest.mark.root

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(20)
print("listening", flush=True)
c, _ = s.accept(); c.sendall(c.recv(1024)); c.close()
"""
ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(sys.argv[3].encode()); print(c.recv(1024).decode())
"""


def details(daemon: Daemon, sandbox_id: str) -> dict:  # type: ignore[type-arg]
    return json.loads(status(daemon, sandbox_id, verbose=True).info["info"])


def pod_ip(daemon: Daemon, sandbox_id: str) -> str:
    return status(daemon, sandbox_id).status.network.ip


def in_netns(netns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={netns}", *argv]


def echo(
    server_netns: str,
    server_port: int,
    connect: tuple[str, int],
    client_netns: str | None = None,
    message: str = "hello pod",
    server_script: str = ECHO_SERVER,
) -> str:
    """An echo server in one pod, a client in another pod (or on the node): the reply."""
    server = subprocess.Popen(
        in_netns(server_netns, sys.executable, "-c", server_script, str(server_port)),
        stdout=subprocess.PIPE,
        text=True,
    )
    client_argv = [sys.executable, "-c", ECHO_CLIENT, connect[0], str(connect[1]), message]
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        client = subprocess.run(
            in_netns(client_netns, *client_argv) if client_netns else client_argv,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return client.stdout.strip()
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def stop(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def remove(daemon: Daemon, sandbox_id: str) -> None:
    daemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)


def test_two_pods_get_distinct_addresses_and_reach_each_other(daemon: Daemon) -> None:
    a, b = run_pod(daemon), run_pod(daemon)
    ip_a, ip_b = pod_ip(daemon, a), pod_ip(daemon, b)
    subnet = ipaddress.ip_network(daemon.pod_subnet)
    assert ip_a != ip_b and ipaddress.ip_address(ip_a) in subnet and ipaddress.ip_address(ip_b) in subnet
    net_a, net_b = details(daemon, a)["namespaces"]["net"], details(daemon, b)["namespaces"]["net"]
    assert echo(net_a, 7007, (ip_a, 7007), net_b) == "hello pod"
    route = subprocess.run(in_netns(net_b, "ip", "route"), capture_output=True, text=True, check=True).stdout
    assert f"default via {next(subnet.hosts())} dev eth0" in route


def test_stop_releases_the_address_and_the_veth(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    ip = pod_ip(daemon, sandbox_id)
    veth = details(daemon, sandbox_id)["network"]["hostInterface"]
    assert veth in veth_names()
    assert (daemon.run_root / "ipam" / ip).read_text() == sandbox_id
    stop(daemon, sandbox_id)
    assert not (daemon.run_root / "ipam" / ip).exists()
    assert not status(daemon, sandbox_id).status.network.ip
    deadline = time.monotonic() + 10
    while veth in veth_names() and time.monotonic() < deadline:
        time.sleep(0.02)  # the kernel frees it with the namespace, in the background
    assert veth not in veth_names()


def test_host_network_pod_reports_the_node_address(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon, network=api_pb2.NODE)
    ip = pod_ip(daemon, sandbox_id)
    assert ip and ipaddress.ip_address(ip) not in ipaddress.ip_network(daemon.pod_subnet)
    assert list((daemon.run_root / "ipam").iterdir()) == []
    files = details(daemon, sandbox_id)["files"]
    assert Path(files["hostname"]).read_text().strip() == os.uname().nodename


def test_many_concurrent_pods_get_distinct_addresses(daemon: Daemon) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            sandbox_id = run_pod(daemon)
            with lock:
                ids.append(sandbox_id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ips = [pod_ip(daemon, i) for i in ids]
    assert len(ids) == 200 and len(set(ips)) == 200
    assert sorted(p.name for p in (daemon.run_root / "ipam").iterdir()) == sorted(ips)


def test_crash_between_allocation_and_reply_loses_nothing(daemon_factory: type[Daemon]) -> None:
    d = daemon_factory()  # type: ignore[call-arg]
    keep = run_pod(d)
    kept_ip = pod_ip(d, keep)
    d.restart(extra_args=["--fail-at", "crash:network"])
    with pytest.raises(grpc.RpcError):
        run_pod(d)  # the daemon dies after taking an address and making a veth
    assert d.proc is not None and d.proc.wait(timeout=10) == 70
    d.start(extra_args=[])
    assert sorted(p.name for p in (d.run_root / "ipam").iterdir()) == [kept_ip]
    assert pod_ip(d, keep) == kept_ip and status(d, keep).status.state == api_pb2.SANDBOX_READY
    fresh = [run_pod(d) for _ in range(3)]
    assert len({kept_ip, *(pod_ip(d, i) for i in fresh)}) == 4


def test_dns_config_becomes_resolv_conf(daemon: Daemon) -> None:
    config = pod_config(hostname="web-0")
    config.dns_config.servers.extend(["10.96.0.10", "2001:db8::53"])
    config.dns_config.searches.extend(["default.svc.cluster.local", "svc.cluster.local"])
    config.dns_config.options.extend(["ndots:5", "edns0"])
    sandbox_id = run_pod(daemon, config)
    files = details(daemon, sandbox_id)["files"]
    assert Path(files["resolv.conf"]).read_text() == (
        "search default.svc.cluster.local svc.cluster.local\n"
        "nameserver 10.96.0.10\nnameserver 2001:db8::53\noptions ndots:5 edns0\n"
    )
    assert Path(files["hostname"]).read_text() == "web-0\n"
    assert f"{pod_ip(daemon, sandbox_id)}\tweb-0" in Path(files["hosts"]).read_text()
    assert "127.0.0.1\tlocalhost" in Path(files["hosts"]).read_text()


def test_no_dns_config_copies_the_hosts_resolv_conf(daemon: Daemon) -> None:
    sandbox_id = run_pod(daemon)
    files = details(daemon, sandbox_id)["files"]
    assert Path(files["resolv.conf"]).read_bytes() == Path("/etc/resolv.conf").read_bytes()


@pytest.mark.parametrize(
    ("dns", "message"),
    [
        ({"servers": ["not-an-ip"]}, "not an IP address"),
        ({"options": ["ndots:5\nnameserver 6.6.6.6"]}, "malformed"),
        ({"searches": ["a b"]}, "malformed"),
        ({"servers": ["1.1.1.1"] * 4}, "the limit is 3"),
        ({"servers": ["fe80::1%x\noptions rotate\nnameserver 6.6.6.6"]}, "not a plain IP address"),
    ],
)
def test_bad_dns_config_is_rejected(daemon: Daemon, dns: dict[str, list[str]], message: str) -> None:
    config = pod_config()
    config.dns_config.MergeFrom(api_pb2.DNSConfig(**dns))
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (err.value.details() or "")
    assert list((daemon.run_root / "ipam").iterdir()) == []


def test_nftables_table_is_pyshims_own(daemon: Daemon) -> None:
    table = subprocess.run(
        ["nft", "list", "table", "ip", daemon.nft_table], capture_output=True, text=True, check=True
    ).stdout
    assert f"ip saddr {daemon.pod_subnet} ip daddr != {daemon.pod_subnet} masquerade" in table
    # Pods must not reach the node's 127.0.0.1 through route_localnet on the bridge.
    assert f'iifname "{daemon.bridge}" ip daddr 127.0.0.0/8 drop' in table
    # A restart re-makes it without duplicating rules.
    daemon.restart()
    again = subprocess.run(
        ["nft", "list", "table", "ip", daemon.nft_table], capture_output=True, text=True
    ).stdout
    assert again.count("masquerade") == table.count("masquerade")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_host_port_reaches_the_pod_from_loopback(daemon: Daemon) -> None:
    host_port = free_port()
    config = pod_config()
    config.port_mappings.add(protocol=api_pb2.TCP, container_port=8080, host_port=host_port)
    sandbox_id = run_pod(daemon, config)
    net = details(daemon, sandbox_id)["namespaces"]["net"]
    assert echo(net, 8080, ("127.0.0.1", host_port), message="via host port") == "via host port"
    maps = subprocess.run(
        ["nft", "list", "table", "ip", daemon.nft_table], capture_output=True, text=True
    ).stdout
    assert f"{host_port} : {pod_ip(daemon, sandbox_id)} . 8080" in maps
    # Kept across a restart, gone after Stop.
    daemon.restart()
    maps = subprocess.run(
        ["nft", "list", "table", "ip", daemon.nft_table], capture_output=True, text=True
    ).stdout
    assert f"{host_port} : {pod_ip(daemon, sandbox_id)} . 8080" in maps
    stop(daemon, sandbox_id)
    maps = subprocess.run(
        ["nft", "list", "table", "ip", daemon.nft_table], capture_output=True, text=True
    ).stdout
    assert f"{host_port} :" not in maps


def test_host_port_taken_twice_is_refused_and_rolled_back(daemon: Daemon) -> None:
    host_port = free_port()
    first = pod_config()
    first.port_mappings.add(protocol=api_pb2.UDP, container_port=53, host_port=host_port, host_ip="127.0.0.1")
    run_pod(daemon, first)
    second = pod_config()
    second.port_mappings.add(
        protocol=api_pb2.UDP, container_port=5353, host_port=host_port, host_ip="127.0.0.1"
    )
    before = pause_pids()
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, second)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{host_port}/udp" in (err.value.details() or "")
    assert pause_pids() - before == set()
    assert len(list((daemon.run_root / "ipam").iterdir())) == 1


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"container_port": 0, "host_port": 80}, "container port 0"),
        ({"container_port": 80, "host_port": 70000}, "host port 70000"),
        ({"container_port": 80, "host_port": 80, "host_ip": "::1"}, "not an IPv4 address"),
        ({"container_port": 80, "host_port": 80, "host_ip": "1.2.3.4; drop"}, "not an IPv4 address"),
    ],
)
def test_bad_port_mappings_are_rejected(daemon: Daemon, mapping: dict[str, object], message: str) -> None:
    config = pod_config()
    config.port_mappings.add(**mapping)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (err.value.details() or "")


def test_an_existing_non_bridge_interface_is_refused(daemon_factory: type[Daemon]) -> None:
    d = daemon_factory(start=False)  # type: ignore[call-arg]
    d.extra_args = ["--bridge-name", "lo"]
    with pytest.raises(RuntimeError) as err:
        d.start()
    assert "is not a bridge" in str(err.value)


def test_unspecified_host_ip_means_any_address(daemon: Daemon) -> None:
    host_port = free_port()
    config = pod_config()
    config.port_mappings.add(protocol=api_pb2.TCP, container_port=80, host_port=host_port, host_ip="0.0.0.0")
    sandbox_id = run_pod(daemon, config)
    (mapping,) = details(daemon, sandbox_id)["network"]["portMappings"]
    assert mapping["host_ip"] == ""


ECHO_SERVER6 = ECHO_SERVER.replace("socket.socket()", "socket.socket(socket.AF_INET6)").replace(
    '"0.0.0.0"', '"::"'
)


def test_optional_ipv6_range(daemon_factory: type[Daemon]) -> None:
    subnet6 = f"fd00:{secrets.token_hex(2)}:{secrets.token_hex(2)}::/64"
    d = daemon_factory(extra_args=["--pod-subnet6", subnet6])  # type: ignore[call-arg]
    a, b = run_pod(d), run_pod(d)
    (ip6_a,) = [x.ip for x in status(d, a).status.network.additional_ips]
    (ip6_b,) = [x.ip for x in status(d, b).status.network.additional_ips]
    assert ip6_a != ip6_b and all(
        ipaddress.ip_address(x) in ipaddress.ip_network(subnet6) for x in (ip6_a, ip6_b)
    )
    net_a, net_b = details(d, a)["namespaces"]["net"], details(d, b)["namespaces"]["net"]
    assert echo(net_a, 7008, (ip6_a, 7008), net_b, "over v6", ECHO_SERVER6) == "over v6"
    route = subprocess.run(
        in_netns(net_b, "ip", "-6", "route"), capture_output=True, text=True, check=True
    ).stdout
    assert "default via" in route
    d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=a), timeout=30)
    assert ip6_a not in {p.name for p in (d.run_root / "ipam6").iterdir()}


def _network_info(daemon: Daemon) -> dict:  # type: ignore[type-arg]
    response = daemon.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    return json.loads(response.info["info"])["network"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_full_bridge_is_resource_exhausted(daemon_factory: type[Daemon]) -> None:
    """A Linux bridge takes 1023 ports: the pod after that gets RESOURCE_EXHAUSTED
    saying so, and Status says how many pods the network can still take."""
    daemon = daemon_factory(start=False)  # type: ignore[call-arg]
    # Its own network namespace: the 1000 links below go with it at once at the end
    # (deleted one by one they would take ~17 s).
    daemon.netns = f"pst{daemon.tag}"
    subprocess.run(["ip", "netns", "add", daemon.netns], check=True)
    try:
        daemon.pod_subnet = f"10.{200 + secrets.randbelow(50)}.{16 * secrets.randbelow(16)}.0/20"
        daemon.start()
        before = _network_info(daemon)
        assert before["podsAvailable"] == 1023 - before["bridgePorts"]
        # Fill the bridge with tap links (cheap, unlike pods), leaving room for one pod.
        fillers = [f"pd{i:x}" for i in range(1023 - before["bridgePorts"] - 1)]
        batch = "".join(f"tuntap add {n} mode tap\nlink set {n} master {daemon.bridge}\n" for n in fillers)
        subprocess.run(
            ["ip", "-n", daemon.netns, "-batch", "-"], input=batch, text=True, check=True, capture_output=True
        )
        assert _network_info(daemon)["podsAvailable"] == 1
        last = run_pod(daemon)
        assert _network_info(daemon)["podsAvailable"] == 0
        pauses = pause_pids()
        with pytest.raises(grpc.RpcError) as err:
            run_pod(daemon)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"bridge {daemon.bridge} is full" in (err.value.details() or "")
        assert pause_pids() == pauses
        listed = daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
        assert [p.id for p in listed] == [last]
        daemon.cleanup()
    finally:
        subprocess.run(["ip", "netns", "del", daemon.netns], check=False)
