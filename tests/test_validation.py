"""Bad and hostile requests get a clear status and change nothing. (Failures at each
step of RunPodSandbox: test_failure_injection.py; random hostile requests: test_fuzz.py.)"""

from __future__ import annotations

import grpc
import pytest
from conftest import Daemon, nsfs_mounts_under, pause_pids, pod_config, run_pod

from shim._proto import api_pb2

pytestmark = pytest.mark.root


def assert_nothing_made(daemon: Daemon, pauses_before: set[int]) -> None:
    assert pause_pids() - pauses_before == set()
    assert nsfs_mounts_under(daemon.base) == []
    assert list((daemon.root / "sandboxes").iterdir()) == []
    assert list((daemon.run_root / "sandboxes").iterdir()) == []
    assert list(daemon.netns_dir.iterdir()) == []
    assert daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []


def _bad_configs() -> list[tuple[str, api_pb2.RunPodSandboxRequest, str]]:
    def req(config: api_pb2.PodSandboxConfig, handler: str = "") -> api_pb2.RunPodSandboxRequest:
        return api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler)

    no_meta = pod_config()
    no_meta.ClearField("metadata")
    cases = [
        ("no config", api_pb2.RunPodSandboxRequest(), "config is required"),
        ("no metadata", req(no_meta), "metadata is required"),
    ]
    for field_name in ("name", "namespace", "uid"):
        c = pod_config()
        setattr(c.metadata, field_name, "")
        cases.append((f"empty {field_name}", req(c), f"metadata.{field_name} is required"))
    for field_name, value in (
        ("name", "../../etc"),
        ("namespace", "a/b"),
        ("uid", "../x"),
        ("name", "A" * 300),
    ):
        c = pod_config()
        setattr(c.metadata, field_name, value)
        cases.append((f"hostile {field_name}", req(c), f"metadata.{field_name}"))
    cases += [
        ("1 MB label", req(pod_config(labels={"big": "x" * (1024 * 1024)})), "label 'big'"),
        ("too many labels", req(pod_config(labels={f"k{i}": "v" for i in range(300)})), "300 labels"),
        ("huge annotations", req(pod_config(annotations={"a": "x" * (300 * 1024)})), "annotations take"),
        ("bad hostname", req(pod_config(hostname="bad host/name")), "hostname"),
        ("unknown handler", req(pod_config(), handler="kata"), "unknown runtime handler 'kata'"),
        # Was echoed whole: a status header over gRPC's limit, RESOURCE_EXHAUSTED at the client.
        ("huge handler", req(pod_config(), handler="é" * 30000), "unknown runtime handler 'ééé"),
        ("node sysctl", req(pod_config(sysctls={"kernel.panic": "1"})), "not namespaced"),
        ("sysctl path", req(pod_config(sysctls={"net/../../kernel/panic": "1"})), "malformed"),
        ("sysctl dotdot", req(pod_config(sysctls={"net.ipv4..conf": "1"})), "malformed"),
        (
            "host-net sysctl",
            req(pod_config(network=api_pb2.NODE, sysctls={"net.ipv4.ip_forward": "1"})),
            "host network",
        ),
        ("network CONTAINER", req(pod_config(network=api_pb2.CONTAINER)), "network namespace mode"),
    ]
    c = pod_config()
    c.log_directory = "/var/log/../../etc"
    cases.append(("log dir dotdot", req(c), "log_directory"))
    c = pod_config()
    c.log_directory = "/var/log/pods/a\nb"
    cases.append(("log dir newline", req(c), "log_directory"))
    # `re.match` with `$` accepts a trailing newline: every check must refuse it.
    cases += [
        ("name newline", req(pod_config(name="nl-pod\n")), "metadata.name"),
        ("namespace newline", req(pod_config(namespace="default\n")), "metadata.namespace"),
        ("uid newline", req(pod_config(uid="uid-1\n")), "metadata.uid"),
        ("hostname newline", req(pod_config(hostname="evil\n")), "hostname"),
        ("sysctl newline", req(pod_config(sysctls={"net.ipv4.ip_forward\n": "1"})), "malformed"),
        ("sysctl kernel.sem newline", req(pod_config(sysctls={"kernel.sem\n": "1"})), "malformed"),
    ]
    c = pod_config()
    c.dns_config.searches.extend(["a\n", "nameserver"])
    cases.append(("dns search newline", req(c), "DNS search"))
    c = pod_config()
    c.dns_config.options.append("ndots:5\n")
    cases.append(("dns option newline", req(c), "DNS search or option"))
    c = pod_config()
    c.linux.security_context.run_as_group.value = 5
    cases.append(("group without user", req(c), "run_as_group needs run_as_user"))
    return cases


@pytest.mark.parametrize("case", _bad_configs(), ids=lambda c: c[0])
def test_bad_run_requests_are_invalid_argument(
    daemon: Daemon, case: tuple[str, api_pb2.RunPodSandboxRequest, str]
) -> None:
    _, request, message = case
    before = pause_pids()
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.RunPodSandbox(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in (err.value.details() or "")
    assert_nothing_made(daemon, before)


def test_malformed_ids(daemon: Daemon) -> None:
    for call, request in (
        (daemon.runtime.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id="../../etc/passwd")),
        (daemon.runtime.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id="")),
        (daemon.runtime.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id="a" * 64 + "\n")),
        (daemon.runtime.StopPodSandbox, api_pb2.StopPodSandboxRequest(pod_sandbox_id="")),
        (daemon.runtime.RemovePodSandbox, api_pb2.RemovePodSandboxRequest(pod_sandbox_id="")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Stop and Remove of something that cannot exist are no-ops, as the CRI asks.
    daemon.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id="../../etc"), timeout=10)
    daemon.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id="../../etc"), timeout=10)


def test_oversized_message_is_refused_by_transport(daemon: Daemon) -> None:
    request = api_pb2.RunPodSandboxRequest(config=pod_config(labels={"big": "x" * (20 * 1024 * 1024)}))
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.RunPodSandbox(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert daemon.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pyshim"


def test_userns_with_mappings_is_unimplemented(daemon: Daemon) -> None:
    config = pod_config()
    userns = config.linux.security_context.namespace_options.userns_options
    userns.mode = api_pb2.POD
    userns.uids.add(host_id=100000, container_id=0, length=65536)
    before = pause_pids()
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, config)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert_nothing_made(daemon, before)


@pytest.mark.parametrize(
    ("sysctl", "value", "said"),
    [
        ("net.ipv4.no_such_knob", "1", "no such setting"),
        ("net.ipv4.ip_forward", "abc", "refused by the kernel"),
    ],
)
def test_sysctl_the_kernel_refuses_is_invalid_argument(
    daemon: Daemon, sysctl: str, value: str, said: str
) -> None:
    before = pause_pids()
    # Passes validation (a well-formed namespaced name): only the kernel can say no.
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, sysctls={sysctl: value})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sysctl in (err.value.details() or "") and said in (err.value.details() or "")
    assert_nothing_made(daemon, before)


def test_undefined_enum_values(daemon: Daemon) -> None:
    before = pause_pids()
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, network=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "network namespace mode 5" in (err.value.details() or "")
    assert_nothing_made(daemon, before)
    flt = api_pb2.PodSandboxFilter(state=api_pb2.PodSandboxStateValue(state=7))  # type: ignore[arg-type]
    assert daemon.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=flt), timeout=10).items == []


def test_oversized_config_is_refused(daemon: Daemon) -> None:
    config = pod_config()
    config.dns_config.searches.extend(["x" * 1000] * 3000)  # fields pyshim does not check one by one
    before = pause_pids()
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is" in (err.value.details() or "")
    assert_nothing_made(daemon, before)
