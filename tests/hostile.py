"""Hypothesis strategies for hostile CRI requests, and a model of which
RunPodSandbox requests are valid (the documented contract: README's limits and
CRI rules), shared by the daemon fuzzing (test_fuzz.py) and the unit tests.

Every field is drawn from "valid" or "hostile" values, valid first, so that a
failing example shrinks towards a valid request with only the field that matters
left hostile. Hostile: unicode, control characters (a trailing "\\n" above all),
path-like names, empty and huge values (sizes up to a few MiB, made cheaply by
repetition), undefined enum values, malformed ids.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from shim._proto import api_pb2
from shim.errors import InvalidArgument
from shim.validate import resources

KiB, MiB = 1024, 1024 * 1024

HOSTILE_WORDS = [
    "", ".", "..", "/", "//", "../../etc", "../x", "/etc/passwd", "a/b", "a\\b", "~",
    "a\n", "\n", "a\r\n", "\r", "a\x00b", "\x00", "\t", " ", "a b", " a", "a ", "\x1b[31m",
    "é", "日本語", "\u202eevil", "\ufeffbom", "a\u0301", "🙂", "\u2028", "\x85",
    "-a", "a-", "a_b", "_", "A", "a.b", "a..b", ".a", "a.", "a:b", "a=b", "a,b",
    "$(id)", "`id`", "a;b", "a|b", "%s%n", "{}", "*", "?", "0", "-1", "true", "null",
]  # fmt: skip
# Lengths around every documented limit, up to a few MiB: past 4 MiB the transport refuses.
BIG_SIZES = [
    63, 64, 128, 129, 253, 254, 256, 257, 317, 318, 4096, 4097,
    64 * KiB, 256 * KiB, 256 * KiB + 1, MiB, 2 * MiB, 2 * MiB + 1, 4 * MiB + 128 * KiB,
]  # fmt: skip

ALNUM = string.ascii_letters + string.digits


def repeated(chars: str, sizes: Sequence[int] = BIG_SIZES) -> st.SearchStrategy[str]:
    """A character repeated to a length near a limit: huge values without drawing each character."""
    return st.builds(lambda c, n: c * n, st.sampled_from(chars), st.sampled_from(sizes))


def either(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, hostile)  # shrinks towards the first: valid


def words(first: str, rest: str, max_size: int = 20) -> st.SearchStrategy[str]:
    return st.builds(lambda a, b: a + b, st.sampled_from(first), st.text(rest, max_size=max_size))


hostile_text: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(HOSTILE_WORDS),
    st.text(max_size=30),  # any unicode but surrogates (a protobuf string must be UTF-8)
    st.text(
        st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2029"), min_size=1, max_size=5
    ),
    words(ALNUM, ALNUM).map(lambda w: w + "\n"),
    st.builds(lambda w, s: w + s, words(ALNUM, ALNUM), st.sampled_from(["\n", "\x00", "/..", " ", "é"])),
    repeated("a.é\n/"),
)

# ---- ids --------------------------------------------------------------------------------------

HEX = "0123456789abcdef"


# How to make an id argument from a real id, drawn independently of the id (pods made
# during an example get random ids, and hypothesis must draw the same way each time).
NEAR_MISSES = st.one_of(
    st.tuples(st.just("append"), st.sampled_from(["\n", " ", "0", "\x00", "/", "é", "self"])),
    st.tuples(st.just("prepend"), st.sampled_from(["\n", " ", "/", "../", "../../"])),
    st.tuples(st.just("prefix+newline"), st.integers(1, 64)),
    st.tuples(st.just("upper"), st.just(0)),
    st.tuples(st.just("not hex at"), st.integers(0, 63)),
)
ID_VARIANTS = st.one_of(
    st.tuples(st.just("whole"), st.just(0)), st.tuples(st.just("prefix"), st.integers(1, 63)), NEAR_MISSES
)


def id_variant(spec: tuple[str, Any], known: str) -> str:
    """A real id, a prefix of it, or (near misses) something close that is never a prefix of it."""
    kind, arg = spec
    if kind == "whole":
        return known
    if kind == "prefix":
        return known[:arg]
    if kind == "append":
        return known + (known if arg == "self" else arg)
    if kind == "prepend":
        return arg + known
    if kind == "prefix+newline":
        return known[:arg] + "\n"
    if kind == "upper":
        upper = known.upper()
        return upper if upper != known else known + "G"
    assert kind == "not hex at"
    return known[:arg] + "g" + known[arg + 1 :]


any_id: st.SearchStrategy[str] = st.one_of(
    st.text(HEX, max_size=70),
    st.text(HEX.upper(), min_size=1, max_size=64),
    st.text(HEX, min_size=64, max_size=64).map(lambda i: i + "\n"),
    hostile_text,
)

# ---- generic messages, from the descriptor --------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def enum_values(f: FieldDescriptor) -> st.SearchStrategy[int]:
    """A defined value of the field's enum, or any int32 (proto3 enums are open)."""
    return st.one_of(
        st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-(2**31), 2**31 - 1)
    )


def _scalar(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return hostile_text
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return enum_values(f)
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.integers(low, high)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    assert t == FieldDescriptor.TYPE_MESSAGE, t
    return messages(f.message_type, depth + 1)


@cache
def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: every field absent or set to a hostile value; nested
    messages to a depth of 3; repeated fields and maps of up to 3 entries."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.builds(cls)
    setters: dict[str, st.SearchStrategy[Callable[[Message], None]]] = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            entries = st.dictionaries(_scalar(key_f, depth), _scalar(value_f, depth), max_size=3)
            setters[f.name] = entries.map(lambda d, n=f.name: _set_map(n, d))
        elif f.is_repeated:
            values = st.lists(_scalar(f, depth), max_size=3)
            setters[f.name] = values.map(lambda v, n=f.name: _set_repeated(n, v))
        else:
            setters[f.name] = _scalar(f, depth).map(lambda v, n=f.name: _set_one(n, v))
    return st.fixed_dictionaries({}, optional=setters).map(lambda s: _build(cls, s.values()))


def _build(cls: type[Message], setters: Any) -> Message:
    message = cls()
    for setter in setters:
        setter(message)
    return message


def _set_one(name: str, value: Any) -> Callable[[Message], None]:
    def setter(message: Message) -> None:
        if isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)

    return setter


def _set_repeated(name: str, values: list[Any]) -> Callable[[Message], None]:
    return lambda message: getattr(message, name).extend(values)


def _set_map(name: str, entries: dict[Any, Any]) -> Callable[[Message], None]:
    def setter(message: Message) -> None:
        target = getattr(message, name)
        for key, value in entries.items():
            if isinstance(value, Message):
                target[key].CopyFrom(value)
            else:
                target[key] = value

    return setter


def requests_of(method: str, service: str = "RuntimeService") -> st.SearchStrategy[Message]:
    descriptor = api_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type
    return messages(descriptor)


# ---- RunPodSandbox ---------------------------------------------------------------------------

NAME_CHARS = ALNUM + ".-"
valid_name = either(words(ALNUM, NAME_CHARS), st.sampled_from(["a" * 253, "A.b-C", "0"]))
valid_uid = either(words(ALNUM, NAME_CHARS + "_"), st.sampled_from(["u" * 128, "f81d4fae-7dec-11d0-a765"]))
_label = words(string.ascii_lowercase + string.digits, string.ascii_lowercase + string.digits, max_size=8)
valid_hostname = either(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.sampled_from(["h" * 63, "a-b", "x1.y2"]),
)
valid_log_dir = either(
    valid_name.map(lambda n: f"/var/log/pods/{n}"), st.sampled_from(["/", "/var/log/a..b", "/" + "d" * 4095])
)
valid_label_key = either(st.text(string.printable.strip(), min_size=1, max_size=20), st.just("k" * 317))
valid_label_value = either(st.text(max_size=20), st.sampled_from(["v" * 4096, "é" * 2048, ""]))
# Sysctls a fresh pod namespace accepts with these values (the kernel's answer is known).
GOOD_SYSCTLS = {
    "net.ipv4.ip_unprivileged_port_start": ["0", "1024"],
    "net.ipv4.ping_group_range": ["0 2147483647", "1 0"],
    "net.ipv4.ip_local_port_range": ["32768 60999"],
    "net.ipv4.tcp_syncookies": ["1", "0"],
    "net.ipv4.conf.all.forwarding": ["0", "1"],
    "net.core.somaxconn": ["1024"],
    "kernel.shm_rmid_forced": ["1", "0"],
    "kernel.msgmax": ["8192"],
    "kernel.sem": ["250 32000 32 128"],
    "fs.mqueue.msg_max": ["10"],
}
good_sysctl = st.sampled_from(sorted(GOOD_SYSCTLS)).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from(GOOD_SYSCTLS[k]))
)
# Well-formed and namespaced, but only the kernel knows whether it takes them.
kernel_decides_sysctl = st.tuples(
    st.one_of(
        st.sampled_from(sorted(GOOD_SYSCTLS)),
        st.text(string.ascii_lowercase + "_", min_size=1, max_size=12).map(lambda w: f"net.ipv4.{w}"),
        st.sampled_from(
            ["net.ipv4", "net.ipv4.conf", "kernel.shmmax", "kernel.msgmnb", "fs.mqueue.queues_max"]
        ),
    ),
    either(st.text(string.digits + " ", max_size=12), st.text(max_size=12).filter(lambda v: "\0" not in v)),
)
hostile_sysctl_key = st.one_of(
    hostile_text,
    st.sampled_from(
        [
            "kernel.panic", "vm.swappiness", "net/../kernel/panic", "net..ipv4", "Net.ipv4.x", "net",
            "net.", "kernel.shm", "kernel.semx", "fs.mqueue", "net.ipv4.ip_forward\n", "kernel.sem\n",
            "net.ipv4." + "x" * 130, "net.ipv4.a b", "net.ipv4.é",
        ]
    ),
)  # fmt: skip
hostile_sysctl_value = st.one_of(hostile_text, st.sampled_from(["1\n", "\x00", "a" * 257, "1" * 256]))

valid_ip = st.ip_addresses().map(str)
_DNS_CHARS = ALNUM + "_.:-"
valid_dns_word = either(st.text(_DNS_CHARS, min_size=1, max_size=20), st.just("s" * 253))
hostile_ip = st.one_of(
    hostile_text,
    st.sampled_from(["fe80::1%eth0", "FE80::1", "01.2.3.4", "1.2.3.4\n", "::ffff:1.2.3.4", "1.2.3"]),
)


@dataclass(frozen=True)
class Persistent:
    """A pod of the fuzzed daemon that every example must leave as it is."""

    id: str
    metadata: api_pb2.PodSandboxMetadata
    ready: bool
    # (protocol, host_port, host_ip) of its host ports
    ports: tuple[tuple[int, int, str], ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


_UNDEFINED = st.integers(-(2**31), 2**31 - 1)
_HOST_MODES = st.sampled_from([api_pb2.POD, api_pb2.NODE])
_PORT = st.builds(
    api_pb2.PortMapping,
    protocol=st.sampled_from([api_pb2.TCP, api_pb2.UDP, api_pb2.SCTP]),
    container_port=st.integers(1, 65535),
    host_port=st.one_of(st.just(0), st.integers(30000, 30050)),
    host_ip=st.sampled_from(["", "127.0.0.1", "0.0.0.0", "10.0.0.1"]),
)


def _one_bad_field(
    valid: st.SearchStrategy[Message], bad: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Message]:
    """A valid message with exactly one field made hostile: one fault, not several that hide each other."""

    def spoil(message: Message, name: str, value: Any) -> Message:
        spoiled = type(message)()
        spoiled.CopyFrom(message)
        if isinstance(value, list):
            spoiled.ClearField(name)
            getattr(spoiled, name).extend(value)
        else:
            setattr(spoiled, name, value)
        return spoiled

    return st.one_of(*(st.builds(spoil, valid, st.just(name), values) for name, values in bad.items()))


_HOSTILE_PORT = _one_bad_field(
    _PORT,
    {
        "protocol": st.one_of(st.just(3), _UNDEFINED),
        "container_port": st.one_of(st.sampled_from([0, 65536, -1]), _UNDEFINED),
        "host_port": st.one_of(st.sampled_from([65536, -1]), _UNDEFINED),
        "host_ip": hostile_ip,
    },
)


def _unique_ports(mappings: list[api_pb2.PortMapping]) -> list[api_pb2.PortMapping]:
    seen, kept = set(), []
    for m in mappings:
        key = (m.protocol, m.host_port, "" if m.host_ip in ("", "0.0.0.0") else m.host_ip)
        if m.host_port == 0 or key not in seen:
            seen.add(key)
            kept.append(m)
    return kept


@cache
def _ports(taken: tuple[tuple[int, int, str], ...]) -> st.SearchStrategy[list[api_pb2.PortMapping]]:
    """Valid host-port mappings: new ports, or (a conflict) exactly what a pod holds."""
    held = [
        api_pb2.PortMapping(protocol=p, container_port=80, host_port=port, host_ip=ip)
        for p, port, ip in taken
    ]
    one = st.one_of(_PORT, st.sampled_from(held)) if held else _PORT
    return st.lists(one, max_size=3).map(_unique_ports)


_HOSTILE_PORTS = st.one_of(
    st.tuples(st.lists(_PORT, max_size=2), _HOSTILE_PORT).map(lambda t: [*_unique_ports(t[0]), t[1]]),
    _PORT.filter(lambda m: m.host_port != 0).map(lambda m: [m, m]),  # the same host port twice
    st.integers(128, 129).map(lambda n: [api_pb2.PortMapping(container_port=80)] * n),
)
_LABELS = st.dictionaries(valid_label_key, valid_label_value, max_size=4)
_HOSTILE_LABELS = st.one_of(
    st.tuples(_LABELS, either(valid_label_key, hostile_text), either(valid_label_value, hostile_text)).map(
        lambda t: {**t[0], t[1]: t[2]}
    ),
    st.integers(256, 257).map(lambda n: {f"k{i}": "v" for i in range(n)}),
)
_ANNOTATIONS = st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4)
_HOSTILE_ANNOTATIONS = st.one_of(
    st.dictionaries(
        either(st.text(max_size=20), hostile_text), either(st.text(max_size=20), hostile_text), max_size=4
    ),
    # The whole budget (256 KiB), one byte over it, and over it in 2-byte characters.
    st.integers(0, 1).map(lambda extra: {"a": "x" * (256 * KiB - 1 + extra)}),
    st.just({"a": "é" * (128 * KiB)}),
)
_DNS_CONFIG = st.builds(
    api_pb2.DNSConfig,
    servers=st.lists(valid_ip, max_size=3),
    searches=st.lists(valid_dns_word, max_size=3),
    options=st.lists(valid_dns_word, max_size=3),
)
_DNS = st.one_of(st.none(), _DNS_CONFIG)
_HOSTILE_DNS = st.one_of(
    _one_bad_field(
        _DNS_CONFIG,
        {
            "servers": st.one_of(hostile_ip.map(lambda ip: [ip]), st.just(["10.0.0.1"] * 4)),
            "searches": st.one_of(hostile_text.map(lambda w: ["a", w]), st.just(["s"] * 33)),
            "options": st.one_of(hostile_text.map(lambda w: [w]), st.just(["o"] * 17)),
        },
    ),
)


def _fitting_sysctls(host_network: bool, host_ipc: bool) -> st.SearchStrategy[list[tuple[str, str]]]:
    # net.* needs the pod's own network namespace, the others its own IPC namespace.
    keys = [k for k in sorted(GOOD_SYSCTLS) if (not host_network if k.startswith("net.") else not host_ipc)]
    if not keys:
        return st.just([])
    pair = st.sampled_from([(k, value) for k in keys for value in GOOD_SYSCTLS[k]])
    return st.lists(pair, max_size=3, unique_by=lambda kv: kv[0])


_SYSCTLS = {(n, i): _fitting_sysctls(n, i) for n in (False, True) for i in (False, True)}
_HOSTILE_SYSCTLS = st.one_of(
    st.lists(st.one_of(good_sysctl, kernel_decides_sysctl), min_size=1, max_size=2),
    st.lists(
        st.tuples(either(st.sampled_from(sorted(GOOD_SYSCTLS)), hostile_sysctl_key), hostile_sysctl_value),
        min_size=1,
        max_size=2,
    ),
    st.integers(64, 65).map(lambda n: [(f"net.ipv4.conf.x{i}.forwarding", "1") for i in range(n)]),
)
_ID_MAPPING = st.builds(
    api_pb2.IDMapping,
    host_id=st.integers(0, 2**32 - 1),
    container_id=st.integers(0, 2**32 - 1),
    length=st.integers(0, 2**32 - 1),
)
_INT64 = st.integers(-(2**63), 2**63 - 1)

# Per field: (valid values, hostile values).
_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "handler": (st.sampled_from(["", "crun", "runc"]), hostile_text),
    "metadata": (
        st.sampled_from(["fresh"] * 5 + ["duplicate"]),
        st.sampled_from(["no config", "none", "empty"]),
    ),
    "name": (valid_name, hostile_text),
    "namespace": (valid_name, hostile_text),
    "uid": (valid_uid, hostile_text),
    "hostname": (st.one_of(st.just(""), valid_hostname), hostile_text),
    "log_directory": (st.one_of(st.just(""), valid_log_dir), hostile_text),
    "labels": (_LABELS, _HOSTILE_LABELS),
    "annotations": (_ANNOTATIONS, _HOSTILE_ANNOTATIONS),
    "dns": (_DNS, _HOSTILE_DNS),
    "ports": (st.nothing(), _HOSTILE_PORTS),  # valid ones depend on the existing pods
    # Only ever under a test prefix: a valid parent is made on the node's real cgroupfs.
    "cgroup_parent": (st.sampled_from(["", "/pyshim-test-fuzz/burstable/pod1"]), hostile_text),
    "network": (_HOST_MODES, st.one_of(st.sampled_from([api_pb2.CONTAINER, api_pb2.TARGET]), _UNDEFINED)),
    "pid": (
        st.sampled_from([api_pb2.POD, api_pb2.CONTAINER, api_pb2.NODE]),
        st.one_of(st.just(api_pb2.TARGET), _UNDEFINED),
    ),
    "ipc": (_HOST_MODES, st.one_of(st.sampled_from([api_pb2.CONTAINER, api_pb2.TARGET]), _UNDEFINED)),
    "target_id": (st.just(""), hostile_text),
    "sysctls": (st.nothing(), _HOSTILE_SYSCTLS),  # valid ones depend on the namespace modes
    "userns": (
        st.one_of(st.none(), st.builds(api_pb2.UserNamespace, mode=_HOST_MODES)),
        st.builds(
            api_pb2.UserNamespace,
            mode=st.one_of(_HOST_MODES, _UNDEFINED, st.sampled_from([api_pb2.CONTAINER, api_pb2.TARGET])),
            uids=st.lists(_ID_MAPPING, max_size=1),
            gids=st.lists(_ID_MAPPING, max_size=1),
        ),
    ),
    "security": (  # run_as_user, run_as_group
        st.one_of(
            st.tuples(st.none(), st.none()),
            st.tuples(st.integers(0, 2**31), st.none() | st.integers(0, 2**31)),
        ),
        st.tuples(st.none() | _INT64, st.none() | _INT64),
    ),
    "unchecked": (st.just(False), st.just(True)),
}
_UNCHECKED = st.tuples(
    messages(api_pb2.SecurityProfile.DESCRIPTOR),
    messages(api_pb2.SELinuxOption.DESCRIPTOR),
    messages(api_pb2.LinuxContainerResources.DESCRIPTOR),
    messages(api_pb2.WindowsPodSandboxConfig.DESCRIPTOR),
)
# Mostly none or one hostile field: a request whose only fault is one field shows
# whether that field's check works; several faults mostly hide each other.
_HOSTILE_FIELDS = st.sampled_from([0, 0, 1, 1, 1, 1, 2, 3]).flatmap(
    lambda n: st.frozensets(st.sampled_from(sorted(_FIELDS)), min_size=n, max_size=n)
)


@st.composite
def run_requests(draw: st.DrawFn, existing: Sequence[Persistent] = ()) -> api_pb2.RunPodSandboxRequest:
    """RunPodSandbox requests: valid except for a few fields (none, often) that get
    hostile values. `existing` pods' metadata may be reused (duplicates) and their
    host ports asked for again (conflicts)."""
    hostile = draw(_HOSTILE_FIELDS, label="hostile fields")

    def pick(name: str, valid: st.SearchStrategy[Any] | None = None) -> Any:
        good, bad = _FIELDS[name]
        return draw(bad if name in hostile else (good if valid is None else valid), label=name)

    request = api_pb2.RunPodSandboxRequest(runtime_handler=pick("handler"))
    metadata = pick("metadata")
    if metadata == "no config":
        return request
    c = request.config
    if metadata == "duplicate" and existing:
        # A READY pod's (the retry gets it) or a NOTREADY pod's (ALREADY_EXISTS).
        pods = [p for p in existing if not p.ready][:1] + [p for p in existing if p.ready][:2]
        c.metadata.CopyFrom(draw(st.sampled_from(pods)).metadata)
    elif metadata == "empty":
        c.metadata.SetInParent()
    elif metadata != "none":
        c.metadata.name = pick("name")
        c.metadata.namespace = pick("namespace")
        c.metadata.uid = pick("uid")
        c.metadata.attempt = draw(st.integers(0, 2**32 - 1))
    c.hostname = pick("hostname")
    c.log_directory = pick("log_directory")
    c.labels.update(pick("labels"))
    c.annotations.update(pick("annotations"))
    dns = pick("dns")
    if dns is not None:
        c.dns_config.CopyFrom(dns)
    c.port_mappings.extend(
        pick("ports", _ports(tuple(port for p in existing if p.ready for port in p.ports)))
    )
    linux = c.linux
    linux.cgroup_parent = pick("cgroup_parent")
    sc = linux.security_context
    opts = sc.namespace_options
    opts.network, opts.pid, opts.ipc = pick("network"), pick("pid"), pick("ipc")
    opts.target_id = pick("target_id")
    linux.sysctls.update(pick("sysctls", _SYSCTLS[opts.network == api_pb2.NODE, opts.ipc == api_pb2.NODE]))
    userns = pick("userns")
    if userns is not None:
        opts.userns_options.CopyFrom(userns)
    user, group = pick("security")
    if user is not None:
        sc.run_as_user.value = user
    if group is not None:
        sc.run_as_group.value = group
    sc.privileged = draw(st.booleans())
    sc.readonly_rootfs = draw(st.booleans())
    sc.supplemental_groups.extend(draw(st.lists(_INT64, max_size=3)))
    if pick("unchecked"):
        # Fields pyshim does not look at yet: anything goes, within the size limit.
        seccomp, selinux, resources, windows = draw(_UNCHECKED)
        sc.seccomp.CopyFrom(seccomp)
        sc.selinux_options.CopyFrom(selinux)
        linux.resources.CopyFrom(resources)
        c.windows.CopyFrom(windows)
    return request


# ---- the model: which requests the contract says are valid ------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
_SYSCTL = re.compile(r"[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+")
_DNS = re.compile(r"[A-Za-z0-9_.:-]{1,253}")
_CGROUP_NAME = re.compile(r"[A-Za-z0-9_.:@=+-]{1,255}")


@dataclass
class Verdict:
    """What the contract says of a RunPodSandbox request, before the kernel is asked."""

    invalid: list[str] = field(default_factory=list)  # each rule broken
    unimplemented: bool = False  # user namespaces with id mappings
    kernel_decides: bool = False  # sysctls only the kernel can judge

    @property
    def valid(self) -> bool:
        return not self.invalid and not self.unimplemented


def _namespaced(key: str) -> bool:
    return bool(re.fullmatch(r"net\..+|kernel\.shm.+|kernel\.msg.+|kernel\.sem|fs\.mqueue\..+", key))


def verdict(request: api_pb2.RunPodSandboxRequest, handlers: Sequence[str] = ("crun", "runc")) -> Verdict:
    v = Verdict()
    bad = v.invalid.append
    if not request.HasField("config"):
        bad("config")
        return v
    c = request.config
    if request.runtime_handler not in ("", *handlers):
        bad("runtime_handler")
    md = c.metadata
    if not c.HasField("metadata"):
        bad("metadata")
    if not (md.name and len(md.name) <= 253 and _NAME.fullmatch(md.name)):
        bad("name")
    if not (md.namespace and len(md.namespace) <= 253 and _NAME.fullmatch(md.namespace)):
        bad("namespace")
    if not (md.uid and len(md.uid) <= 128 and _UID.fullmatch(md.uid)):
        bad("uid")
    if c.hostname and not (
        len(c.hostname) <= 63 and all(_HOST_LABEL.fullmatch(p) for p in c.hostname.split("."))
    ):
        bad("hostname")
    log = c.log_directory
    if log and not (
        log.startswith("/") and len(log) <= 4096 and log.isprintable() and ".." not in log.split("/")
    ):
        bad("log_directory")
    if len(c.labels) > 256 or any(
        not 0 < len(k) <= 317 or len(x.encode()) > 4096 for k, x in c.labels.items()
    ):
        bad("labels")
    if sum(len(k.encode()) + len(x.encode()) for k, x in c.annotations.items()) > 256 * KiB:
        bad("annotations")
    sc = c.linux.security_context
    opts = sc.namespace_options
    if opts.network not in (api_pb2.POD, api_pb2.NODE):
        bad("network mode")
    if opts.ipc not in (api_pb2.POD, api_pb2.NODE):
        bad("ipc mode")
    if opts.pid not in (api_pb2.POD, api_pb2.CONTAINER, api_pb2.NODE):
        bad("pid mode")
    if opts.HasField("userns_options"):
        mode = opts.userns_options.mode
        if mode not in (api_pb2.POD, api_pb2.NODE):
            bad("userns mode")
        elif mode == api_pb2.POD and (opts.userns_options.uids or opts.userns_options.gids):
            v.unimplemented = True
    if sc.HasField("run_as_group") and not sc.HasField("run_as_user"):
        bad("run_as_group")
    sysctls = c.linux.sysctls
    if len(sysctls) > 64:
        bad("sysctls")
    for key, value in sysctls.items():
        if not (len(key) <= 128 and _SYSCTL.fullmatch(key) and ".." not in key and _namespaced(key)):
            bad(f"sysctl {key!r}")
        elif len(value) > 256 or "\n" in value or "\0" in value:
            bad(f"sysctl value {key}")
        elif key.startswith("net.") and opts.network == api_pb2.NODE:
            bad(f"sysctl {key} with host network")
        elif not key.startswith("net.") and opts.ipc == api_pb2.NODE:
            bad(f"sysctl {key} with host ipc")
        elif value not in GOOD_SYSCTLS.get(key, ()):
            v.kernel_decides = True
    if c.ByteSize() > 2 * MiB:
        bad("config size")
    parent = c.linux.cgroup_parent
    names = [p for p in parent.split("/") if p]
    if parent and not (
        parent.startswith("/")
        and len(parent) <= 1024
        and names
        and all(_CGROUP_NAME.fullmatch(p) and p not in (".", "..") for p in names)
    ):
        bad("cgroup_parent")
    for what, res in (("resources", c.linux.resources), ("overhead", c.linux.overhead)):
        try:
            # The same ranges as a container's (unit-tested there); limits the kernel may
            # still refuse (CPUs this node lacks) are its call.
            resources(res, what)
        except InvalidArgument:
            bad(what)
        if res.ByteSize() and not parent:
            v.kernel_decides = True
    dns = c.dns_config
    if len(dns.servers) > 3 or len(dns.searches) > 32 or len(dns.options) > 16:
        bad("dns counts")
    for server in dns.servers:
        if not _plain_ip(server):
            bad(f"dns server {server!r}")
    if not all(_DNS.fullmatch(w) for w in [*dns.searches, *dns.options]):
        bad("dns words")
    if len(c.port_mappings) > 128:
        bad("port mapping count")
    seen = set()
    for m in c.port_mappings:
        if not (m.protocol in (0, 1, 2) and 1 <= m.container_port <= 65535 and 0 <= m.host_port <= 65535):
            bad("port mapping numbers")
            continue
        try:
            host_ip = "" if not m.host_ip else str(ipaddress.IPv4Address(m.host_ip))
        except ValueError:
            bad("host_ip")
            continue
        key = (m.protocol, m.host_port, "" if host_ip == "0.0.0.0" else host_ip)
        if m.host_port and key in seen:
            bad("host port twice")
        seen.add(key)
    return v


def _plain_ip(text: str) -> bool:
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text and str(parsed) == text.lower()


def host_port_taken(request: api_pb2.RunPodSandboxRequest, existing: Sequence[Persistent]) -> bool:
    """Whether the request maps a host port that a READY pod of `existing` holds
    (same protocol, port and address: the same nftables map element)."""
    c = request.config
    if c.linux.security_context.namespace_options.network != api_pb2.POD:
        return False  # a host-network pod's mappings make nothing
    held = {(p, port, ip) for pod in existing if pod.ready for (p, port, ip) in pod.ports}
    for m in c.port_mappings:
        ip = "" if m.host_ip in ("", "0.0.0.0") else m.host_ip
        if (m.protocol, m.host_port, ip) in held:
            return True
    return False
