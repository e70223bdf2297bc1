"""Linux capabilities: names, the daemon's own set, and a container's sets from
its security context, as containerd computes them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shim._proto import api_pb2

# Bit number -> name, up to CAP_CHECKPOINT_RESTORE (40), from linux/capability.h.
NAMES: tuple[str, ...] = tuple(
    f"CAP_{n}"
    for n in [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
)
KNOWN = frozenset(NAMES)

# What containerd (and CRI-O, Docker) give a container that asks for nothing more.
DEFAULT: tuple[str, ...] = tuple(
    f"CAP_{n}"
    for n in [
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    ]
)

_NAME = re.compile(r"[A-Za-z_]{1,40}")


def canonical(name: str) -> str | None:
    """ "CAP_CHOWN" for "chown", "CHOWN", "cap_chown" or "CAP_CHOWN"; "ALL" for any case
    of "all"; None for anything else (an unknown capability, a trailing newline)."""
    if not _NAME.fullmatch(name):
        return None
    upper = name.upper()
    if upper == "ALL":
        return "ALL"
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    return full if full in KNOWN else None


def from_mask(mask: int) -> frozenset[str]:
    """Names of the bits set in a capability mask (CapBnd in /proc/PID/status); bits
    past the last name this module knows are left out."""
    return frozenset(name for bit, name in enumerate(NAMES) if mask >> bit & 1)


def to_mask(names: frozenset[str] | set[str] | tuple[str, ...]) -> int:
    return sum(1 << NAMES.index(n) for n in set(names))


@dataclass(frozen=True, slots=True)
class CapabilitySets:
    bounding: tuple[str, ...]  # also effective and permitted
    ambient: tuple[str, ...]  # also inheritable

    def oci(self) -> dict[str, list[str]]:
        """process.capabilities. Inheritable holds only the ambient set (CVE-2022-24769:
        an inheritable set would leak into setcap'd programs)."""
        return {
            "bounding": list(self.bounding),
            "effective": list(self.bounding),
            "permitted": list(self.bounding),
            "inheritable": list(self.ambient),
            "ambient": list(self.ambient),
        }


def compute(sc: api_pb2.LinuxContainerSecurityContext, host: frozenset[str]) -> CapabilitySets:
    """A container's capabilities: privileged gets every capability the node has (its
    add/drop are ignored, as containerd does); otherwise the default set, then add ALL,
    drop ALL, each add, each drop, in that order (so "drop ALL, add X" is only X), then
    the ambient ones. Every set is clamped to `host`: the runtime cannot grant what the
    daemon itself lacks. Names were checked by validation (unknown ones are skipped)."""
    caps = sc.capabilities
    adds = [c for c in map(canonical, caps.add_capabilities) if c]
    drops = [c for c in map(canonical, caps.drop_capabilities) if c]
    ambient = [c for c in map(canonical, caps.add_ambient_capabilities) if c and c != "ALL"]
    chosen: set[str]
    if sc.privileged:
        chosen = set(host)
    else:
        chosen = set(DEFAULT)
        if "ALL" in adds:
            chosen = set(KNOWN)
        if "ALL" in drops:
            chosen = set()
        chosen |= {c for c in adds if c != "ALL"}
        chosen -= set(drops)
    chosen |= set(ambient)
    return CapabilitySets(bounding=_ordered(chosen & host), ambient=_ordered(set(ambient) & host))


def _ordered(names: set[str]) -> tuple[str, ...]:
    return tuple(n for n in NAMES if n in names)
