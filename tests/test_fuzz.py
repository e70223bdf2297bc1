"""Property-based tests (hypothesis) of every RuntimeService method against one real
daemon: hostile requests for each implemented call, every unimplemented call, and
undecodable bytes. For each example:

- the daemon stays up (it answers Version);
- the reply code is one that call may give (never INTERNAL or UNKNOWN for a bad
  request), and for RunPodSandbox, ids and lists exactly what the contract says
  (a model: hostile.verdict for Run, the pods the module made for ids and filters);
- a refused request changes nothing: no pause, pin, record, run dir, address, veth
  or host-port map element appears, and ListPodSandbox is as before;
- a valid request that succeeds made what it asked for, and is removed again.

The module's daemon holds pods that every example must leave as they are: a READY
pod with a host port (conflicts), a NOTREADY one (duplicates), and 16 host-network
pods (so that some id prefixes are ambiguous).

CI runs a fixed seed and modest example counts (conftest); PYSHIM_FUZZ_EXAMPLES=N
runs N examples per test from a random seed.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conftest import Daemon, examples, pod_config, run_pod
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from hostile import (
    HEX,
    ID_VARIANTS,
    NEAR_MISSES,
    Persistent,
    any_id,
    host_port_taken,
    hostile_text,
    id_variant,
    messages,
    requests_of,
    run_requests,
    verdict,
)
from hypothesis import assume, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from leaks import DaemonState, assert_state, daemon_state

from shim import server
from shim._proto import api_pb2

pytestmark = [pytest.mark.root, pytest.mark.fuzz]

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

# What each implemented call may answer to any request (a request over the transport's
# limit is RESOURCE_EXHAUSTED for every call). Never INTERNAL, never UNKNOWN.
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "Version": {OK},
    "Status": {OK},
    "RuntimeConfig": {OK},
    "RunPodSandbox": {OK, INVALID, ALREADY_EXISTS, FAILED_PRECONDITION, UNIMPLEMENTED},
    "StopPodSandbox": {OK, INVALID},
    "RemovePodSandbox": {OK, INVALID},
    "PodSandboxStatus": {OK, INVALID, NOT_FOUND},
    "ListPodSandbox": {OK},
    # Until containers exist: nothing to list, nothing found, stop and remove succeed
    # (a malformed id may become INVALID_ARGUMENT once they do).
    "ListContainers": {OK},
    "ContainerStatus": {NOT_FOUND, INVALID},
    "StopContainer": {OK, INVALID},
    "RemoveContainer": {OK, INVALID},
    "ListContainerStats": {OK},
}


# ---- the module's daemon and its pods ------------------------------------------------------


@dataclass
class World:
    d: Daemon
    pods: list[Persistent]
    created: dict[str, int]  # id -> created_at
    base: DaemonState
    base_listing: bytes = b""

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pods]

    def persistent(self, sandbox_id: str) -> Persistent | None:
        return next((p for p in self.pods if p.id == sandbox_id), None)

    def alive(self) -> None:
        d = self.d
        assert d.proc is not None and d.proc.poll() is None, f"the daemon died:\n{d.log.read_text()[-3000:]}"
        assert d.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pyshim"

    def unchanged(self, what: str) -> None:
        self.alive()
        assert_state(self.d, self.base, what)
        # Every field of every pod too (labels, annotations, metadata, times).
        assert self.listing() == self.base_listing, what

    def listing(self) -> bytes:
        reply = self.d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)
        return bytes(reply.SerializeToString(deterministic=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = Daemon(base=tmp_path_factory.mktemp("fuzz"))
    try:
        d.start()
        pods = []
        ready = pod_config(labels={"fuzz": "yes", "role": "ready"})
        ready.port_mappings.add(protocol=api_pb2.TCP, container_port=80, host_port=30080)
        pods.append(
            Persistent(
                run_pod(d, ready), ready.metadata, True, ((api_pb2.TCP, 30080, ""),), dict(ready.labels)
            )
        )
        stopped = pod_config(labels={"fuzz": "yes", "role": "notready"})
        stopped.port_mappings.add(protocol=api_pb2.UDP, container_port=53, host_port=30081)
        stopped_id = run_pod(d, stopped)
        d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=stopped_id), timeout=30)
        pods.append(Persistent(stopped_id, stopped.metadata, False, (), dict(stopped.labels)))
        # 18 ids in all: at least two share their first digit.
        for i in range(16):
            labels = {"fuzz": "yes", "role": "host", "idx": str(i), "parity": "odd" if i % 2 else "even"}
            config = pod_config(network=api_pb2.NODE, labels=labels)
            pods.append(Persistent(run_pod(d, config), config.metadata, True, (), labels))
        listed = d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
        created = {p.id: p.created_at for p in listed}
        deadline = time.monotonic() + 10
        while len(daemon_state(d).veths) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # the stopped pod's veth goes in the kernel's background
        base = daemon_state(d)
        assert len(base.veths) == 1 and len(base.host_ports) == 1
        world = World(d, pods, created, base)
        world.base_listing = world.listing()
        yield world
        assert "Traceback" not in d.log.read_text(), "the daemon logged a traceback"
    finally:
        d.cleanup()


# ---- calling -------------------------------------------------------------------------------------


def call(world: World, method: str, request: Message) -> tuple[grpc.StatusCode, Any]:
    """(code, reply or error) of a call; server-streaming calls are read to the end."""
    service = "ImageService" if method in _IMAGE_METHODS else "RuntimeService"
    stub = world.d.images if service == "ImageService" else world.d.runtime
    streaming = _METHODS[service][method].server_streaming
    try:
        # A stream (GetContainerEvents) stays open while all is well: read it for a moment.
        reply = getattr(stub, method)(request, timeout=1 if streaming else 30)
        if streaming:
            reply = list(reply)
        return OK, reply
    except grpc.RpcError as err:
        if streaming and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return OK, err
        return err.code(), err


def expect(code: grpc.StatusCode, allowed: set[grpc.StatusCode], request: Message, reply: Any) -> None:
    event(code.name)  # hypothesis' statistics (--hypothesis-show-statistics) count the answers
    details = reply.details() if isinstance(reply, grpc.RpcError) else ""
    if request.ByteSize() > server.MAX_REQUEST:
        allowed = {RESOURCE_EXHAUSTED}
    assert code in allowed, f"{code.name} ({details!r}) not in {sorted(c.name for c in allowed)}"


_METHODS = {
    service: {m.name: m for m in api_pb2.DESCRIPTOR.services_by_name[service].methods}
    for service in ("RuntimeService", "ImageService")
}
_IMAGE_METHODS = set(_METHODS["ImageService"])


def _is_stub(service: str, method: str) -> bool:
    """Whether the server answers this method with its generic UNIMPLEMENTED handler."""
    cls = server.RuntimeService if service == "RuntimeService" else server.ImageService
    wrapped = getattr(getattr(cls, method), "__wrapped__", None)
    return wrapped is not None and wrapped.__qualname__.startswith("_unimplemented.")


# ---- RunPodSandbox ---------------------------------------------------------------------------


@given(data=st.data())
@hsettings(max_examples=examples(400))
def test_run_pod_sandbox(world: World, data: st.DataObject) -> None:
    request = data.draw(run_requests(world.pods), label="request")
    v = verdict(request)
    duplicate = next(
        (p for p in world.pods if request.HasField("config") and p.metadata == request.config.metadata), None
    )
    if v.invalid:
        allowed = {INVALID, UNIMPLEMENTED} if v.unimplemented else {INVALID}
    elif v.unimplemented:
        allowed = {UNIMPLEMENTED}
    elif duplicate is not None:
        # kubelet's retry of a READY pod gets it; a NOTREADY pod's name stays taken.
        allowed = {OK} if duplicate.ready else {ALREADY_EXISTS}
    else:
        allowed = {FAILED_PRECONDITION} if host_port_taken(request, world.pods) else {OK}
        if v.kernel_decides:
            allowed.add(INVALID)  # a sysctl only the kernel can refuse
    code, reply = call(world, "RunPodSandbox", request)
    world.alive()
    expect(code, allowed, request, reply)
    assert code in ALLOWED["RunPodSandbox"] | {RESOURCE_EXHAUSTED}
    if code == OK:
        sandbox_id = reply.pod_sandbox_id
        if duplicate is not None:
            assert sandbox_id == duplicate.id
        else:
            try:
                made_as_asked(world, request, sandbox_id)
            finally:
                world.d.runtime.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30
                )
    world.unchanged(f"after RunPodSandbox answered {code.name}")


def made_as_asked(world: World, request: api_pb2.RunPodSandboxRequest, sandbox_id: str) -> None:
    """The pod is READY and reports back exactly what it was asked for."""
    c = request.config
    reply = world.d.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10
    )
    status = reply.status
    assert status.id == sandbox_id and status.state == api_pb2.SANDBOX_READY
    assert status.metadata == c.metadata
    assert dict(status.labels) == dict(c.labels) and dict(status.annotations) == dict(c.annotations)
    assert status.runtime_handler == (request.runtime_handler or "crun")
    opts, asked = status.linux.namespaces.options, c.linux.security_context.namespace_options
    assert (opts.network, opts.pid, opts.ipc) == (asked.network, asked.pid, asked.ipc)
    pod_network = asked.network == api_pb2.POD
    if pod_network:
        assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(world.d.pod_subnet)
    else:
        assert status.network.ip
    info = json.loads(reply.info["info"])
    assert info["config"] == json_format.MessageToDict(c)  # the config exactly as sent
    assert info["hostname"] == (c.hostname if pod_network else "")
    files = info["files"]
    dns = c.dns_config
    if dns.servers or dns.searches or dns.options:
        lines = [f"search {' '.join(dns.searches)}"] if dns.searches else []
        lines += [f"nameserver {s}" for s in dns.servers]
        lines += [f"options {' '.join(dns.options)}"] if dns.options else []
        with open(files["resolv.conf"]) as f:
            assert f.read().splitlines() == lines
    if pod_network and c.hostname:
        with open(files["hosts"]) as f:
            assert f"{status.network.ip}\t{c.hostname}" in f.read().splitlines()


# ---- PodSandboxStatus, StopPodSandbox, RemovePodSandbox: ids ---------------------------------


def resolve(ids: list[str], value: str) -> str | None:
    """What the daemon's lookup finds: an id, None, or "ambiguous"."""
    if value in ids:
        return value
    matches = [i for i in ids if i.startswith(value)]
    return "ambiguous" if len(matches) > 1 else (matches[0] if matches else None)


def shared_prefixes(ids: list[str]) -> list[str]:
    prefixes = {i[:n] for i in ids for n in range(1, 6)}
    return sorted(p for p in prefixes if sum(i.startswith(p) for i in ids) > 1)


@given(data=st.data())
@hsettings(max_examples=examples(150))
def test_sandbox_calls_by_id(world: World, data: st.DataObject) -> None:
    d = world.d
    method = data.draw(
        st.sampled_from(["PodSandboxStatus", "StopPodSandbox", "RemovePodSandbox"]), label="method"
    )
    fresh_network = data.draw(st.sampled_from([None, api_pb2.POD, api_pb2.NODE]), label="fresh pod")
    fresh = run_pod(d, network=fresh_network) if fresh_network is not None else None
    ids = world.ids + ([fresh] if fresh else [])
    try:
        target = data.draw(
            st.sampled_from(["any", "persistent", "shared prefix", *(["fresh"] * 2 if fresh else [])])
        )
        if target == "fresh":
            value = id_variant(data.draw(ID_VARIANTS, label="id variant"), fresh)
        elif target == "persistent":
            pod = data.draw(st.sampled_from(world.pods), label="pod")
            # A Stop of a stopped pod changes nothing; any other hit on these pods would.
            harmless = method == "PodSandboxStatus" or (method == "StopPodSandbox" and not pod.ready)
            value = id_variant(
                data.draw(ID_VARIANTS if harmless else NEAR_MISSES, label="id variant"), pod.id
            )
        elif target == "shared prefix":
            prefixes = shared_prefixes(ids)
            value = prefixes[data.draw(st.integers(0, 999), label="prefix") % len(prefixes)]
        else:
            value = data.draw(any_id, label="id")
        found = resolve(ids, value)
        hit = world.persistent(found or "")
        if method != "PodSandboxStatus" and hit is not None:
            assume(method == "StopPodSandbox" and not hit.ready)  # "any" text that names a pod of the module
        if method == "PodSandboxStatus":
            request: Message = api_pb2.PodSandboxStatusRequest(
                pod_sandbox_id=value, verbose=data.draw(st.booleans(), label="verbose")
            )
            well_formed = 0 < len(value) <= 64 and all(c in HEX for c in value)
            want = (
                {INVALID}
                if not well_formed or found == "ambiguous"
                else {NOT_FOUND}
                if found is None
                else {OK}
            )
        else:
            request = getattr(api_pb2, f"{method}Request")(pod_sandbox_id=value)
            want = {INVALID} if value == "" or found == "ambiguous" else {OK}
        code, reply = call(world, method, request)
        world.alive()
        expect(code, want, request, reply)
        if code == OK and method == "PodSandboxStatus":
            assert reply.status.id == found
        if fresh:
            # Only the pod the id names was touched.
            listed = {
                p.id: p.state
                for p in d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
            }
            hit_fresh = code == OK and found == fresh
            if hit_fresh and method == "RemovePodSandbox":
                assert fresh not in listed
            else:
                stopped = hit_fresh and method == "StopPodSandbox"
                assert listed[fresh] == (api_pb2.SANDBOX_NOTREADY if stopped else api_pb2.SANDBOX_READY)
    finally:
        if fresh:
            d.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=fresh), timeout=30)
    world.unchanged(f"after {method}({value!r})")


# ---- ListPodSandbox: filters ---------------------------------------------------------------


def expected_list(world: World, request: api_pb2.ListPodSandboxRequest) -> list[str]:
    pods = world.pods
    flt = request.filter
    if request.HasField("filter") and flt.ByteSize():
        if flt.id and not (len(flt.id) <= 64 and all(c in HEX for c in flt.id)):
            return []
        pods = [p for p in pods if p.id.startswith(flt.id)]
        if flt.HasField("state"):
            if flt.state.state not in (api_pb2.SANDBOX_READY, api_pb2.SANDBOX_NOTREADY):
                return []
            want_ready = flt.state.state == api_pb2.SANDBOX_READY
            pods = [p for p in pods if p.ready == want_ready]
        pods = [p for p in pods if all(p.labels.get(k) == v for k, v in flt.label_selector.items())]
    return [p.id for p in sorted(pods, key=lambda p: world.created[p.id], reverse=True)]


_LABEL_KEYS = st.one_of(st.sampled_from(["fuzz", "role", "idx", "parity", "none"]), hostile_text)
_LABEL_VALUES = st.one_of(
    st.sampled_from(["yes", "ready", "notready", "host", "odd", "even", "3", ""]), hostile_text
)


@given(data=st.data())
@hsettings(max_examples=examples(80))
def test_list_pod_sandbox_filters(world: World, data: st.DataObject) -> None:
    request = api_pb2.ListPodSandboxRequest()
    if data.draw(st.booleans(), label="filter"):
        flt = request.filter
        flt.SetInParent()
        kind = data.draw(st.sampled_from(["none", "pod", "shared", "any"]), label="id kind")
        if kind == "pod":
            pod = data.draw(st.sampled_from(world.ids), label="pod")
            flt.id = id_variant(data.draw(ID_VARIANTS, label="id variant"), pod)
        elif kind == "shared":
            prefixes = shared_prefixes(world.ids)
            flt.id = prefixes[data.draw(st.integers(0, 999), label="prefix") % len(prefixes)]
        elif kind == "any":
            flt.id = data.draw(any_id, label="id")
        state = data.draw(st.one_of(st.none(), st.sampled_from([0, 1]), st.integers(-(2**31), 2**31 - 1)))
        if state is not None:
            flt.state.state = state
        flt.label_selector.update(data.draw(st.dictionaries(_LABEL_KEYS, _LABEL_VALUES, max_size=3)))
    code, reply = call(world, "ListPodSandbox", request)
    world.alive()
    expect(code, ALLOWED["ListPodSandbox"], request, reply)
    if code == OK:
        assert [p.id for p in reply.items] == expected_list(world, request)
    world.unchanged("after ListPodSandbox")


# ---- the other implemented calls: any request -------------------------------------------------


def _version(reply: api_pb2.VersionResponse) -> None:
    assert (reply.runtime_name, reply.runtime_api_version) == ("pyshim", "v1")


def _status(reply: api_pb2.StatusResponse) -> None:
    conditions = {c.type: c.status for c in reply.status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}


def _runtime_config(reply: api_pb2.RuntimeConfigResponse) -> None:
    assert reply.linux.cgroup_driver == api_pb2.CGROUPFS


def _empty(field: str) -> Callable[[Any], None]:
    def check(reply: Any) -> None:
        assert list(getattr(reply, field)) == []

    return check


_REPLY_CHECKS: dict[str, Callable[[Any], None]] = {
    "Version": _version,
    "Status": _status,
    "RuntimeConfig": _runtime_config,
    "ListContainers": _empty("containers"),
    "ListContainerStats": _empty("stats"),
}
_SIMPLE = ["Version", "Status", "RuntimeConfig", "ListContainers", "ContainerStatus", "StopContainer"]
_SIMPLE += ["RemoveContainer", "ListContainerStats"]


@pytest.mark.parametrize("method", _SIMPLE)
@given(data=st.data())
@hsettings(max_examples=examples(40))
def test_other_implemented_calls(world: World, method: str, data: st.DataObject) -> None:
    request = data.draw(requests_of(method), label="request")
    code, reply = call(world, method, request)
    world.alive()
    expect(code, ALLOWED[method], request, reply)
    if code == OK and method in _REPLY_CHECKS:
        _REPLY_CHECKS[method](reply)
    world.unchanged(f"after {method}")


# ---- every other method -------------------------------------------------------------------------


def _other_methods() -> list[tuple[str, str]]:
    """Every method not tested above: the unimplemented ones of both services, and any
    RuntimeService method implemented after this module was written."""
    found = []
    for service, methods in _METHODS.items():
        for name in methods:
            if name in ALLOWED:
                continue
            if _is_stub(service, name) or service == "RuntimeService":
                found.append((service, name))
    return found


@pytest.mark.parametrize(("service", "method"), _other_methods(), ids=lambda x: x)
@given(data=st.data())
@hsettings(max_examples=examples(5))
def test_unimplemented_calls_say_so(world: World, service: str, method: str, data: st.DataObject) -> None:
    request = data.draw(requests_of(method, service), label="request")
    code, reply = call(world, method, request)
    world.alive()
    if _is_stub(service, method):
        expect(code, {UNIMPLEMENTED}, request, reply)
        if code == UNIMPLEMENTED:
            assert f"{service}/{method}" in (reply.details() or "")
    else:
        # Implemented since this module was written: add it to ALLOWED with its own codes.
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), reply
    world.unchanged(f"after {method}")


# ---- bytes that are not a valid request --------------------------------------------------------


def _flip(data: bytes, positions: list[int], xor: int) -> bytes:
    out = bytearray(data)
    for p in positions:
        if out:
            out[p % len(out)] ^= xor
    return bytes(out)


@given(data=st.data())
@hsettings(max_examples=examples(150))
def test_undecodable_bytes(world: World, data: st.DataObject) -> None:
    """Random bytes, or an encoded request with bytes flipped: at worst INVALID_ARGUMENT."""
    method = data.draw(st.sampled_from(sorted(ALLOWED)), label="method")
    input_type = getattr(api_pb2, _METHODS["RuntimeService"][method].input_type.name)
    raw = data.draw(
        st.one_of(
            st.binary(max_size=300),
            st.builds(
                _flip,
                (
                    run_requests(world.pods) if method == "RunPodSandbox" else messages(input_type.DESCRIPTOR)
                ).map(lambda m: m.SerializeToString()),
                st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
                st.integers(1, 255),
            ),
        ),
        label="bytes",
    )
    try:
        decoded: Any = input_type.FromString(raw)
    except DecodeError:
        decoded = None
    else:
        named = getattr(decoded, "pod_sandbox_id", "")
        hit = world.persistent(resolve(world.ids, named) or "") if named else None
        if method in ("StopPodSandbox", "RemovePodSandbox") and hit is not None:
            assume(method == "StopPodSandbox" and not hit.ready)  # it would change a pod of the module
    assert world.d.channel is not None
    raw_call = world.d.channel.unary_unary(f"/runtime.v1.RuntimeService/{method}")
    try:
        reply = raw_call(raw, timeout=30)
        code = OK
    except grpc.RpcError as err:
        code, reply = err.code(), err
    world.alive()
    event(code.name)
    assert code in ALLOWED[method] | {INVALID, RESOURCE_EXHAUSTED}, (code, reply)
    if code == OK and method == "RunPodSandbox":
        sandbox_id = api_pb2.RunPodSandboxResponse.FromString(reply).pod_sandbox_id
        if world.persistent(sandbox_id) is None:
            world.d.runtime.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30
            )
    world.unchanged(f"after {len(raw)} bytes to {method}")
