"""Seccomp for a container: which profile its security context asks for, and that
profile turned into the OCI spec's `linux.seccomp`.

Profiles come in two formats, both accepted from a file:
- containers-common's (Debian's /usr/share/containers/seccomp.json, the RuntimeDefault
  here; also Docker's): `archMap`, and syscall groups with `includes`/`excludes` by
  capability, architecture (Go names: amd64, arm64...) and minimum kernel;
- the OCI spec's own: `architectures` and plain syscall groups.
Conversion keeps what applies to this node's architecture, kernel and the container's
capabilities (as containers/common's setupSeccomp does) and checks every field, so that a
bad profile is refused here with the file's name rather than by the runtime. Messages
name fields and positions but never echo the file's content.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim._proto import api_pb2
from shim.errors import FailedPrecondition

MAX_PROFILE_BYTES = 1024 * 1024
ACTIONS = frozenset(
    {
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_LOG",
    }
)  # SCMP_ACT_NOTIFY is left out: it needs a listener pyshim does not run
OPERATORS = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)
FLAGS = frozenset(
    {
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    }
)
# platform.machine() -> (the arch name of profiles' includes/excludes, libseccomp's name).
ARCHES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "i686": ("x86", "SCMP_ARCH_X86"),
    "i386": ("x86", "SCMP_ARCH_X86"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "armv7l": ("arm", "SCMP_ARCH_ARM"),
    "armv6l": ("arm", "SCMP_ARCH_ARM"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
    "mips64": ("mips64", "SCMP_ARCH_MIPS64"),
    "loongarch64": ("loong64", "SCMP_ARCH_LOONGARCH64"),
}
_SCMP_ARCH = re.compile(r"SCMP_ARCH_[A-Z0-9_]{1,32}")
_SYSCALL = re.compile(r"[a-z0-9_]{1,64}")
_KERNEL = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})")
_MAX_U64 = 2**64 - 1
_CACHE_SIZE = 4  # parsed profiles kept (the default one, a few Localhost ones)
_cache: OrderedDict[tuple[int, ...], Any] = OrderedDict()
_cache_lock = threading.Lock()  # the daemon builds specs from several gRPC threads


class BadProfile(Exception):
    """What is wrong with a profile (a field and position, never its content)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The profile a security context asks for: kind is "runtime/default",
    "unconfined" or "localhost" (then path is the profile file)."""

    kind: str
    path: str = ""


def choose(sc: api_pb2.LinuxContainerSecurityContext) -> Choice:
    """The seccomp profile for a container: unconfined when privileged (as containerd);
    else the `seccomp` field; else the deprecated `seccomp_profile_path`
    ("runtime/default", "docker/default", "unconfined", "localhost/<absolute path>");
    else unconfined, which is what the CRI means by no profile. Validation has checked
    the values."""
    if sc.privileged:
        return Choice("unconfined")
    if sc.HasField("seccomp"):
        profile = sc.seccomp
        if profile.profile_type == api_pb2.SecurityProfile.Localhost:
            return Choice("localhost", profile.localhost_ref)
        if profile.profile_type == api_pb2.SecurityProfile.Unconfined:
            return Choice("unconfined")
        return Choice("runtime/default")
    old = sc.seccomp_profile_path
    if old in ("runtime/default", "docker/default"):
        return Choice("runtime/default")
    if old.startswith("localhost/"):
        return Choice("localhost", old.removeprefix("localhost/"))
    return Choice("unconfined")


def for_container(
    choice: Choice,
    *,
    default_profile: Path | None,
    arch: str,
    capabilities: frozenset[str],
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any] | None:
    """`linux.seccomp` for a chosen profile (None: unconfined), filtered for `arch`
    (platform.machine()), `capabilities` (the container's bounding set) and the
    kernel (default: this one's). FailedPrecondition when RuntimeDefault is asked for
    and the node has no default profile, or when a profile file is missing or bad."""
    if choice.kind == "unconfined":
        return None
    if choice.kind == "runtime/default":
        if default_profile is None:
            raise FailedPrecondition(
                "seccomp RuntimeDefault needs /usr/share/containers/seccomp.json "
                "(Debian package golang-github-containers-common), which this node lacks"
            )
        path = default_profile
    else:
        path = Path(choice.path)
    kernel = kernel if kernel is not None else kernel_version(os.uname().release)
    try:
        return convert(load(path), arch=arch, capabilities=capabilities, kernel=kernel)
    except BadProfile as exc:
        raise FailedPrecondition(f"seccomp profile {path}: {exc}") from None


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as "6.1.0-18-amd64"."""
    match = _KERNEL.match(release)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def load(path: Path) -> Any:
    """The parsed JSON of a profile file: an absolute path to a regular file of at most
    MAX_PROFILE_BYTES. A few parsed files are kept by identity (device, inode, size,
    mtime, ctime), so that the default profile is read and parsed once, not per
    container; callers must not modify what they get."""
    if not path.is_absolute():
        raise BadProfile("the path is not absolute")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadProfile(exc.strerror or "cannot be opened") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadProfile("not a regular file")
        if st.st_size > MAX_PROFILE_BYTES:
            raise BadProfile(f"{st.st_size} bytes, the limit is {MAX_PROFILE_BYTES}")
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _cache_lock:
            if identity in _cache:
                _cache.move_to_end(identity)
                return _cache[identity]
        data = os.read(fd, MAX_PROFILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PROFILE_BYTES:
        raise BadProfile(f"larger than {MAX_PROFILE_BYTES} bytes")
    parsed = _parse(data)
    with _cache_lock:
        _cache[identity] = parsed
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return parsed


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadProfile("not UTF-8 text") from None
    except json.JSONDecodeError as exc:  # its message gives a position, not the content
        raise BadProfile(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def convert(
    profile: Any, *, arch: str, capabilities: frozenset[str], kernel: tuple[int, int]
) -> dict[str, Any]:
    """An OCI LinuxSeccomp from a profile in either format (see the module docstring).
    BadProfile says which field is wrong."""
    if not isinstance(profile, dict):
        raise BadProfile("not a JSON object")
    out: dict[str, Any] = {"defaultAction": _action(profile.get("defaultAction"), "defaultAction")}
    if profile.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = _uint(profile["defaultErrnoRet"], "defaultErrnoRet", 4095)
    architectures = _architectures(profile, arch)
    if architectures:
        out["architectures"] = architectures
    flags = _list(profile.get("flags"), "flags")
    for i, flag in enumerate(flags):
        if flag not in FLAGS:
            raise BadProfile(f"flags[{i}] is not a known seccomp filter flag")
    if flags:
        out["flags"] = list(flags)
    if profile.get("listenerPath"):
        raise BadProfile("asks for a seccomp notify listener (listenerPath), which pyshim does not run")
    go_arch = ARCHES.get(arch, (arch, ""))[0]
    syscalls = []
    for i, call in enumerate(_list(profile.get("syscalls"), "syscalls")):
        converted = _syscall(call, f"syscalls[{i}]")
        if _applies(call, f"syscalls[{i}]", go_arch, capabilities, kernel):
            syscalls.append(converted)
    if syscalls:
        out["syscalls"] = syscalls
    return out


def _architectures(profile: dict[str, Any], arch: str) -> list[str]:
    listed = _list(profile.get("architectures"), "architectures")
    arch_map = _list(profile.get("archMap"), "archMap")
    if listed and arch_map:
        raise BadProfile("has both architectures and archMap; use one")
    for i, name in enumerate(listed):
        _scmp_arch(name, f"architectures[{i}]")
    if listed:
        return list(listed)
    native = ARCHES.get(arch, ("", ""))[1]
    for i, entry in enumerate(arch_map):
        where = f"archMap[{i}]"
        if not isinstance(entry, dict):
            raise BadProfile(f"{where} is not an object")
        main = _scmp_arch(entry.get("architecture"), f"{where}.architecture")
        subs = _list(entry.get("subArchitectures"), f"{where}.subArchitectures")
        for j, sub in enumerate(subs):
            _scmp_arch(sub, f"{where}.subArchitectures[{j}]")
        if main == native:
            return [main, *subs]
    return []  # libseccomp then filters the native architecture only


def _syscall(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise BadProfile(f"{where} is not an object")
    names = _list(call.get("names"), f"{where}.names")
    if call.get("name"):
        if names:
            raise BadProfile(f"{where} has both name and names; use one")
        names = [call["name"]]
    if not names:
        raise BadProfile(f"{where} names no syscall")
    for j, name in enumerate(names):
        if not (isinstance(name, str) and _SYSCALL.fullmatch(name)):
            raise BadProfile(f"{where}.names[{j}] is not a syscall name")
    out: dict[str, Any] = {"names": list(names), "action": _action(call.get("action"), f"{where}.action")}
    if call.get("errnoRet") is not None:
        out["errnoRet"] = _uint(call["errnoRet"], f"{where}.errnoRet", 4095)
    args = [_arg(a, f"{where}.args[{k}]") for k, a in enumerate(_list(call.get("args"), f"{where}.args"))]
    if args:
        out["args"] = args
    return out


def _arg(arg: Any, where: str) -> dict[str, Any]:
    if not isinstance(arg, dict):
        raise BadProfile(f"{where} is not an object")
    op = arg.get("op")
    if op not in OPERATORS:
        raise BadProfile(f"{where}.op is not a known comparison")
    return {
        "index": _uint(arg.get("index"), f"{where}.index", 5),
        "value": _uint(arg.get("value", 0), f"{where}.value", _MAX_U64),
        "valueTwo": _uint(arg.get("valueTwo", 0), f"{where}.valueTwo", _MAX_U64),
        "op": op,
    }


def _applies(
    call: dict[str, Any], where: str, go_arch: str, capabilities: frozenset[str], kernel: tuple[int, int]
) -> bool:
    includes = _filter(call.get("includes"), f"{where}.includes")
    excludes = _filter(call.get("excludes"), f"{where}.excludes")
    if go_arch in excludes["arches"]:
        return False
    if any(cap in capabilities for cap in excludes["caps"]):
        return False
    if excludes["minKernel"] is not None and kernel >= excludes["minKernel"]:
        return False
    if includes["arches"] and go_arch not in includes["arches"]:
        return False
    if not all(cap in capabilities for cap in includes["caps"]):
        return False
    return includes["minKernel"] is None or kernel >= includes["minKernel"]


def _filter(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadProfile(f"{where} is not an object")
    result: dict[str, Any] = {"minKernel": None}
    for key in ("arches", "caps"):
        items = _list(value.get(key), f"{where}.{key}")
        if not all(isinstance(item, str) for item in items):
            raise BadProfile(f"{where}.{key} must be a list of strings")
        result[key] = frozenset(items)
    min_kernel = value.get("minKernel")
    if min_kernel:
        match = _KERNEL.fullmatch(min_kernel) if isinstance(min_kernel, str) else None
        if not match:
            raise BadProfile(f"{where}.minKernel is not MAJOR.MINOR")
        result["minKernel"] = (int(match[1]), int(match[2]))
    return result


def _action(value: Any, where: str) -> str:
    if value not in ACTIONS:
        raise BadProfile(f"{where} is not a supported seccomp action")
    return str(value)


def _scmp_arch(value: Any, where: str) -> str:
    if not (isinstance(value, str) and _SCMP_ARCH.fullmatch(value)):
        raise BadProfile(f"{where} is not an SCMP_ARCH_* name")
    return value


def _uint(value: Any, where: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise BadProfile(f"{where} is not a whole number from 0 to {maximum}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadProfile(f"{where} is not a list")
    return value
