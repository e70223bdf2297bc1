"""shim.validate: every limit and rejection of a RunPodSandbox request, on hand-built requests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import examples
from hostile import run_requests, verdict
from hypothesis import given
from hypothesis import settings as hsettings

from shim._proto import api_pb2
from shim.errors import InvalidArgument, ShimError, Unimplemented
from shim.network import PortMapping
from shim.sandbox_record import NamespaceMode
from shim.validate import MAX_CONFIG_BYTES, id_prefix, sandbox_spec

HANDLERS = ("runc", "kata")


def request(**config: object) -> api_pb2.RunPodSandboxRequest:
    """A valid request; keyword arguments replace PodSandboxConfig fields."""
    c = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web-0", namespace="default", uid="uid-1", attempt=2)
    )
    for name, value in config.items():
        if isinstance(value, dict):
            getattr(c, name).update(value)
        elif isinstance(value, list):
            getattr(c, name).extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(c, name).CopyFrom(value)
        else:
            setattr(c, name, value)
    return api_pb2.RunPodSandboxRequest(config=c)


def refused(req: api_pb2.RunPodSandboxRequest, said: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        sandbox_spec(req, HANDLERS)
    assert said in str(err.value)


def edited(change: Callable[[api_pb2.PodSandboxConfig], object]) -> api_pb2.RunPodSandboxRequest:
    req = request()
    change(req.config)
    return req


def test_a_valid_request_becomes_a_spec() -> None:
    req = request(hostname="web-0", labels={"app": "web"}, annotations={"a": "b"}, log_directory="/var/log/p")
    spec = sandbox_spec(req, HANDLERS)
    assert (spec.metadata.name, spec.metadata.namespace, spec.metadata.uid, spec.metadata.attempt) == (
        "web-0",
        "default",
        "uid-1",
        2,
    )
    assert spec.metadata.reservation == "web-0_default_uid-1_2"
    assert spec.runtime_handler == "runc"  # "" selects the first
    assert (spec.hostname, spec.log_directory) == ("web-0", "/var/log/p")
    assert spec.labels == {"app": "web"} and spec.annotations == {"a": "b"}
    assert spec.modes.network == spec.modes.pid == spec.modes.ipc == NamespaceMode.POD
    assert spec.namespaces == {"net", "uts", "ipc", "pid"}
    assert api_pb2.PodSandboxConfig.FromString(spec.config) == req.config


def test_runtime_handlers() -> None:
    req = request()
    req.runtime_handler = "kata"
    assert sandbox_spec(req, HANDLERS).runtime_handler == "kata"
    req.runtime_handler = "runc\n"
    refused(req, "unknown runtime handler 'runc\\n' (known: runc, kata)")
    req.runtime_handler = "x" * 100000
    with pytest.raises(InvalidArgument) as err:
        sandbox_spec(req, HANDLERS)
    assert len(str(err.value)) < 200  # a request's field is quoted, never echoed whole


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda c: c.ClearField("metadata"), "config.metadata is required"),
        (lambda c: setattr(c.metadata, "name", ""), "metadata.name is required"),
        (lambda c: setattr(c.metadata, "namespace", ""), "metadata.namespace is required"),
        (lambda c: setattr(c.metadata, "uid", ""), "metadata.uid is required"),
    ],
)
def test_metadata_is_required(change: Callable[[api_pb2.PodSandboxConfig], object], said: str) -> None:
    refused(edited(change), said)
    refused(api_pb2.RunPodSandboxRequest(), "config is required")


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        (
            "name",
            ["a" * 253, "A.b-C", "0"],
            ["a" * 254, "a_b", "-a", ".a", "../../etc", "a/b", "é", "a b", "a\n"],
        ),
        ("namespace", ["n" * 253, "kube-system"], ["n" * 254, "a_b", "/", ".", "default\n"]),
        ("uid", ["u" * 128, "a_b-c.d", "f81d4fae-7dec"], ["u" * 129, "_a", "../x", "uid-1\n", "a\x00"]),
    ],
)
def test_metadata_limits(field: str, good: list[str], bad: list[str]) -> None:
    def with_value(value: str) -> api_pb2.RunPodSandboxRequest:
        req = request()
        setattr(req.config.metadata, field, value)
        return req

    for value in good:
        assert getattr(sandbox_spec(with_value(value), HANDLERS).metadata, field) == value
    for value in bad:
        refused(with_value(value), f"config.metadata.{field}")


def test_hostname() -> None:
    for good in ["h" * 63, "a", "a-b", "a.b.c", "A1"]:
        assert sandbox_spec(request(hostname=good), HANDLERS).hostname == good
    for bad in ["h" * 64, "-a", "a-", "a..b", "a.", "a b", "a_b", "évil", "evil\n", "a/b"]:
        refused(request(hostname=bad), "hostname")
    # A host-network pod keeps the node's hostname: the field is checked, then dropped.
    host = request(hostname="web")
    host.config.linux.security_context.namespace_options.network = api_pb2.NODE
    spec = sandbox_spec(host, HANDLERS)
    assert spec.hostname == "" and "uts" not in spec.namespaces and "net" not in spec.namespaces


def test_log_directory() -> None:
    for good in ["", "/", "/var/log/pods/x", "/var/log/a..b", "/" + "d" * 4095]:
        assert sandbox_spec(request(log_directory=good), HANDLERS).log_directory == good
    for bad in ["relative", "/" + "d" * 4096, "/var/log/../etc", "/..", "/a/\n", "/a\x00", "/a\tb"]:
        refused(request(log_directory=bad), "log_directory")


def test_labels() -> None:
    assert sandbox_spec(request(labels={f"k{i}": "v" for i in range(256)}), HANDLERS)
    refused(request(labels={f"k{i}": "v" for i in range(257)}), "257 labels, the limit is 256")
    assert sandbox_spec(request(labels={"k" * 317: "v" * 4096, "é": "é" * 2048}), HANDLERS)
    refused(request(labels={"k" * 318: "v"}), "must be 1-317 bytes")
    refused(request(labels={"": "v"}), "label key '' must be 1-317 bytes")
    refused(request(labels={"k": "v" * 4097}), "value is 4097 bytes, the limit is 4096")
    refused(request(labels={"k": "é" * 2049}), "value is 4098 bytes")  # UTF-8 bytes, not characters


def test_annotations_are_counted_in_utf8_bytes() -> None:
    limit = 256 * 1024
    assert sandbox_spec(request(annotations={"a": "x" * (limit - 1)}), HANDLERS)
    refused(request(annotations={"a": "x" * limit}), f"annotations take {limit + 1} bytes")
    refused(request(annotations={"é": "x" * (limit - 1)}), f"annotations take {limit + 1} bytes")
    assert sandbox_spec(request(annotations={"": "", "\n": "\x00"}), HANDLERS)  # free-form


def test_config_size_limit() -> None:
    # A field nothing else checks: only the size limit stops it.
    big = request()
    big.config.linux.security_context.selinux_options.user = "x" * MAX_CONFIG_BYTES
    refused(big, "the limit is 2097152")
    fits = request()
    fits.config.linux.security_context.selinux_options.user = "x" * (
        MAX_CONFIG_BYTES - fits.config.ByteSize() - 16
    )
    assert fits.config.ByteSize() <= MAX_CONFIG_BYTES and sandbox_spec(fits, HANDLERS)


def test_run_as_group_needs_run_as_user() -> None:
    req = request()
    req.config.linux.security_context.run_as_group.value = 5
    refused(req, "run_as_group needs run_as_user")
    req.config.linux.security_context.run_as_user.value = 0
    assert sandbox_spec(req, HANDLERS)


def _modes(network: int = 0, pid: int = 0, ipc: int = 0) -> api_pb2.RunPodSandboxRequest:
    req = request()
    opts = req.config.linux.security_context.namespace_options
    opts.network, opts.pid, opts.ipc = network, pid, ipc
    return req


def test_namespace_modes() -> None:
    assert sandbox_spec(_modes(pid=api_pb2.CONTAINER), HANDLERS).namespaces == {"net", "uts", "ipc"}
    assert sandbox_spec(_modes(pid=api_pb2.NODE, ipc=api_pb2.NODE), HANDLERS).namespaces == {"net", "uts"}
    assert sandbox_spec(_modes(api_pb2.NODE, api_pb2.NODE, api_pb2.NODE), HANDLERS).namespaces == set()
    for network in (api_pb2.CONTAINER, api_pb2.TARGET):
        refused(_modes(network=network), "network namespace mode")
    for ipc in (api_pb2.CONTAINER, api_pb2.TARGET):
        refused(_modes(ipc=ipc), "ipc namespace mode")
    refused(_modes(pid=api_pb2.TARGET), "pid namespace mode TARGET applies to containers")
    # Undefined enum values (protobuf lets a client send any int): named, not a crash.
    refused(_modes(network=5), "network namespace mode 5 is not one of")
    refused(_modes(pid=-1), "pid namespace mode -1")
    refused(_modes(ipc=2**31 - 1), f"ipc namespace mode {2**31 - 1}")


def test_user_namespaces() -> None:
    for mode in (api_pb2.POD, api_pb2.NODE):
        req = request()
        req.config.linux.security_context.namespace_options.userns_options.mode = mode
        assert sandbox_spec(req, HANDLERS)
    req = request()
    req.config.linux.security_context.namespace_options.userns_options.mode = api_pb2.CONTAINER
    refused(req, "user namespace mode CONTAINER")
    req.config.linux.security_context.namespace_options.userns_options.mode = 9
    refused(req, "user namespace mode 9")
    req.config.linux.security_context.namespace_options.userns_options.mode = api_pb2.POD
    req.config.linux.security_context.namespace_options.userns_options.gids.add(host_id=1, length=1)
    with pytest.raises(Unimplemented):
        sandbox_spec(req, HANDLERS)


def _sysctls(sysctls: dict[str, str], network: int = 0, ipc: int = 0) -> api_pb2.RunPodSandboxRequest:
    req = _modes(network=network, ipc=ipc)
    req.config.linux.sysctls.update(sysctls)
    return req


def test_only_namespaced_sysctls() -> None:
    namespaced = {
        "net.ipv4.ip_forward": "1",
        "net.core.somaxconn": "1024",
        "kernel.shmmax": "1",
        "kernel.shm_rmid_forced": "1",
        "kernel.msgmax": "1",
        "kernel.sem": "1 2 3 4",
        "fs.mqueue.msg_max": "10",
    }
    assert sandbox_spec(_sysctls(namespaced), HANDLERS).sysctls == namespaced
    for key in ["kernel.panic", "vm.swappiness", "kernel.semx", "kernel.shm", "kernel.msg", "fs.file-max"]:
        refused(_sysctls({key: "1"}), "is not namespaced")
    # They would change the node when the pod shares its namespace.
    refused(_sysctls({"net.ipv4.ip_forward": "1"}, network=api_pb2.NODE), "the pod uses the host network")
    refused(_sysctls({"kernel.shmmax": "1"}, ipc=api_pb2.NODE), "the pod uses the host IPC namespace")
    assert sandbox_spec(_sysctls({"kernel.shmmax": "1"}, network=api_pb2.NODE), HANDLERS)
    assert sandbox_spec(_sysctls({"net.ipv4.ip_forward": "1"}, ipc=api_pb2.NODE), HANDLERS)


def test_malformed_sysctls() -> None:
    for key in [
        "net/../../kernel/panic",
        "net.ipv4..conf",
        "net..ipv4",
        "Net.ipv4.x",
        "net",
        "net.",
        "net.ipv4.ip_forward\n",
        "kernel.sem\n",
        "net.ipv4.a b",
        "net.ipv4." + "x" * 120,
        "",
    ]:
        refused(_sysctls({key: "1"}), "is malformed")
    assert sandbox_spec(_sysctls({"net.ipv4.conf.eth0-x.forwarding": "1"}), HANDLERS)
    for value in ["1\n", "a\x00", "x" * 257]:
        refused(_sysctls({"net.ipv4.ip_forward": value}), "value must be one line of at most 256 bytes")
    assert sandbox_spec(_sysctls({"net.ipv4.ip_forward": "x" * 256}), HANDLERS)
    assert sandbox_spec(_sysctls({f"net.ipv4.conf.c{i}.forwarding": "1" for i in range(64)}), HANDLERS)
    refused(
        _sysctls({f"net.ipv4.conf.c{i}.forwarding": "1" for i in range(65)}), "65 sysctls, the limit is 64"
    )


def _dns(
    servers: tuple[str, ...] = (), searches: tuple[str, ...] = (), options: tuple[str, ...] = ()
) -> api_pb2.RunPodSandboxRequest:
    return request(dns_config=api_pb2.DNSConfig(servers=servers, searches=searches, options=options))


def test_dns() -> None:
    spec = sandbox_spec(
        _dns(("10.96.0.10", "2001:db8::53", "fe80::1"), ("svc.cluster.local",), ("ndots:5",)), HANDLERS
    )
    assert spec.dns.servers == ("10.96.0.10", "2001:db8::53", "fe80::1")
    assert spec.dns.searches == ("svc.cluster.local",) and spec.dns.options == ("ndots:5",)
    assert sandbox_spec(_dns(("FE80::1",)), HANDLERS)  # case does not matter
    refused(_dns(("1.1.1.1",) * 4), "4 DNS servers, the limit is 3")
    for bad in ["fe80::1%eth0", "01.2.3.4", "1.2.3.4\n", "1.2.3", "", "::ffff:1.2.3.4x", "localhost"]:
        refused(_dns((bad,)), "DNS server")
    refused(_dns(searches=("s",) * 33), "33 DNS searches, the limit is 32")
    assert sandbox_spec(_dns(searches=("s" * 253,) * 32, options=("o",) * 16), HANDLERS)
    refused(_dns(options=("o",) * 17), "17 DNS options, the limit is 16")
    for bad in ["a\n", "\nnameserver", "a b", "", "s" * 254, "é", "a;b"]:
        refused(_dns(searches=(bad,)), "DNS search or option")
        refused(_dns(options=(bad,)), "DNS search or option")


def _ports(*mappings: api_pb2.PortMapping) -> api_pb2.RunPodSandboxRequest:
    return request(port_mappings=list(mappings))


def test_port_mappings() -> None:
    spec = sandbox_spec(
        _ports(
            api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=80, host_port=8080),
            api_pb2.PortMapping(protocol=api_pb2.UDP, container_port=53, host_port=8080, host_ip="0.0.0.0"),
            api_pb2.PortMapping(
                protocol=api_pb2.SCTP, container_port=1, host_port=65535, host_ip="127.0.0.1"
            ),
            api_pb2.PortMapping(
                protocol=api_pb2.TCP, container_port=65535, host_port=8080, host_ip="10.0.0.1"
            ),
            api_pb2.PortMapping(container_port=80, host_port=0),  # no host port: nothing to map
        ),
        HANDLERS,
    )
    assert spec.port_mappings == (
        PortMapping("tcp", 80, 8080, ""),
        PortMapping("udp", 53, 8080, ""),  # 0.0.0.0 means any, like ""
        PortMapping("sctp", 1, 65535, "127.0.0.1"),
        PortMapping("tcp", 65535, 8080, "10.0.0.1"),
    )
    for mapping, said in [
        (api_pb2.PortMapping(protocol=3, container_port=80), "protocol 3 is not TCP, UDP or SCTP"),
        (api_pb2.PortMapping(protocol=-1, container_port=80), "protocol -1"),
        (api_pb2.PortMapping(container_port=0), "container port 0 is not 1-65535"),
        (api_pb2.PortMapping(container_port=65536), "container port 65536"),
        (api_pb2.PortMapping(container_port=80, host_port=-1), "host port -1 is not 0-65535"),
        (api_pb2.PortMapping(container_port=80, host_port=65536), "host port 65536"),
        (api_pb2.PortMapping(container_port=80, host_port=1, host_ip="::1"), "not an IPv4 address"),
        (api_pb2.PortMapping(container_port=80, host_port=1, host_ip="1.2.3.4\n"), "not an IPv4 address"),
        (api_pb2.PortMapping(container_port=80, host_port=1, host_ip="1.2.3.4; drop"), "not an IPv4 address"),
    ]:
        refused(_ports(mapping), said)
    twice = api_pb2.PortMapping(container_port=80, host_port=8080)
    refused(_ports(twice, twice), "host port 8080/tcp is mapped twice")
    refused(_ports(twice, api_pb2.PortMapping(container_port=81, host_port=8080, host_ip="0.0.0.0")), "twice")
    many = [api_pb2.PortMapping(container_port=80, host_port=0)]
    assert sandbox_spec(_ports(*many * 128), HANDLERS)
    refused(_ports(*many * 129), "129 port mappings, the limit is 128")


def test_id_prefix() -> None:
    for good in ["a", "0" * 64, "0123456789abcdef"]:
        assert id_prefix(good) == good
    for bad, said in [
        ("", "pod sandbox id is required"),
        ("0" * 65, "is not 1-64 lowercase hex"),
        ("ABC", "is not 1-64"),
        ("a" * 64 + "\n", "is not 1-64"),
        ("../../etc", "is not 1-64"),
        (" a", "is not 1-64"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            id_prefix(bad, "container id" if "required" not in said else "pod sandbox id")
        assert said in str(err.value)


@given(run_requests())
@hsettings(max_examples=examples(25))
def test_any_request_is_judged_as_the_contract_says(req: api_pb2.RunPodSandboxRequest) -> None:
    """Whatever the request: a spec or a ShimError (never another exception), and the
    answer the contract (hostile.verdict) gives; a spec's values pass the checks."""
    v = verdict(req, HANDLERS[:1])
    try:
        spec = sandbox_spec(req, HANDLERS[:1])
    except InvalidArgument:
        assert v.invalid
        return
    except Unimplemented:
        assert v.unimplemented
        return
    except ShimError as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}") from exc
    assert v.valid, v.invalid
    assert "\n" not in spec.hostname + spec.metadata.reservation + "".join(spec.sysctls)
