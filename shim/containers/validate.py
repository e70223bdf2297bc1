"""Checks on what a CreateContainer request asks for, before anything is made.

Every message names the field. Every limit bounds what one request can make the
daemon hold or write, or keeps a request string from reaching the kernel, a path or a
JSON file unchecked. Patterns are used with fullmatch: `$` would let a trailing "\\n"
through. What depends on the pod, the image or the node (a user the image lacks, a
missing device) is checked when the spec is built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

from shim._proto import api_pb2
from shim.containers import capabilities
from shim.containers.mounts import destination
from shim.containers.spec import ContainerSpec
from shim.errors import InvalidArgument, Unimplemented
from shim.sandbox_record import NamespaceMode
from shim.validate import (
    MAX_ANNOTATIONS_BYTES,
    MAX_CONFIG_BYTES,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    id_prefix,
    resources,
)

MAX_PATH = 4096  # PATH_MAX
MAX_ARG_STRLEN = 128 * 1024  # the kernel's limit on one argv or environment string
MAX_ARGV_ENV_BYTES = 2 * 1024 * 1024  # ARG_MAX with the usual 8 MiB stack: argv + env
MAX_STRINGS = 65536  # argv or env entries
MAX_IMAGE = 4096
MAX_MOUNTS = 1024
MAX_DEVICES = 1024
MAX_CAPABILITIES = 128  # entries in each of add, drop, ambient
MAX_GROUPS = 1024
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
MAX_PATH_LIST = 256  # masked or read-only paths
MAX_PROFILE_NAME = 256

# Letters, digits, '.', '-', like pod names (kubelet's container names are DNS labels;
# critest's carry capitals). No '_': it separates the parts of the reservation name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_IMAGE = re.compile(r"[!-~]+")  # printable ASCII, no space: references and ids are that
_PERMISSIONS = re.compile(r"(?!.*(.).*\1)[rwm]{0,3}")  # a subset of "rwm", no repeats
_USERNAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,255}\$?")
_PROFILE_NAME = re.compile(r"[!-~]{1,256}")  # an AppArmor profile name: no space or control
_OLD_SECCOMP = ("runtime/default", "docker/default", "unconfined")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


def _show(value: str) -> str:
    """A request string in a message: quoted, escaped, cut short."""
    return repr(value[:80])


def container_spec(request: api_pb2.CreateContainerRequest) -> ContainerSpec:
    """The request, checked whole; InvalidArgument naming the first bad field, or
    Unimplemented for what pyshim does not do (id-mapped or image-volume mounts,
    CDI devices, mount options)."""
    sandbox_id = id_prefix(request.pod_sandbox_id)
    _check(request.HasField("config"), "config is required")
    config = request.config
    _check(config.HasField("metadata"), "config.metadata is required (name, attempt)")
    name = config.metadata.name
    _check(bool(name), "config.metadata.name is required")
    _check(
        len(name) <= MAX_NAME and bool(_NAME.fullmatch(name)),
        f"config.metadata.name {_show(name)} must be letters, digits, '-', '.' (at most {MAX_NAME})",
    )
    image = _image(config)
    _process(config)
    _mounts(config.mounts)
    _devices(config)
    _labels(config.labels, "label")
    _annotations(config.annotations)
    log_path = _log_path(config.log_path)
    _check(
        config.stop_signal in api_pb2.Signal.values(),
        f"config.stop_signal {config.stop_signal} is not a defined signal",
    )
    resources(config.linux.resources, "config.linux.resources")
    _security(config.linux.security_context)
    size = config.ByteSize()
    _check(size <= MAX_CONFIG_BYTES, f"config is {size} bytes, the limit is {MAX_CONFIG_BYTES}")
    return ContainerSpec(
        sandbox_id=sandbox_id,
        name=name,
        attempt=config.metadata.attempt,
        image=image,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        log_path=log_path,
        config=config,
        config_bytes=config.SerializeToString(deterministic=True),
    )


def _image(config: api_pb2.ContainerConfig) -> str:
    spec = config.image
    _check(bool(spec.image), "config.image.image is required")
    for field_name, value in (
        ("image", spec.image),
        ("user_specified_image", spec.user_specified_image),
        ("image_ref", spec.image_ref),
        ("runtime_handler", spec.runtime_handler),
    ):
        _check(
            not value or (len(value) <= MAX_IMAGE and bool(_IMAGE.fullmatch(value))),
            f"config.image.{field_name} {_show(value)} must be printable ASCII without spaces "
            f"(at most {MAX_IMAGE})",
        )
    _labels(spec.annotations, "image annotation")
    return spec.image


def _path(value: str, what: str, *, dotdot: bool = False) -> None:
    """An absolute path of at most MAX_PATH bytes without NUL (the kernel's C string
    would end there) and, unless allowed, without a '..' component."""
    _check(value.startswith("/"), f"{what} {_show(value)} must be an absolute path")
    _check(len(value.encode()) <= MAX_PATH, f"{what} is longer than {MAX_PATH} bytes")
    _check("\0" not in value, f"{what} {_show(value)} holds a NUL character")
    _check(dotdot or ".." not in value.split("/"), f"{what} {_show(value)} must not contain '..'")


def _process(config: api_pb2.ContainerConfig) -> None:
    strings = [("config.command", s) for s in config.command] + [("config.args", s) for s in config.args]
    _check(
        len(strings) <= MAX_STRINGS,
        f"command and args have {len(strings)} entries, the limit is {MAX_STRINGS}",
    )
    _check(len(config.envs) <= MAX_STRINGS, f"{len(config.envs)} envs, the limit is {MAX_STRINGS}")
    total = 0
    for where, value in strings:
        size = len(value.encode()) + 1
        _check(
            size <= MAX_ARG_STRLEN,
            f"an entry of {where} is {size - 1} bytes, the limit is {MAX_ARG_STRLEN - 1}",
        )
        _check("\0" not in value, f"an entry of {where} holds a NUL character")
        total += size
    for kv in config.envs:
        _check(bool(kv.key), "config.envs: a variable has an empty name")
        _check(
            "=" not in kv.key and kv.key.isprintable(),
            f"config.envs: the name {_show(kv.key)} must not contain '=' or control characters",
        )
        try:
            value = kv.value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"config.envs: the value of {_show(kv.key)} is not UTF-8") from None
        _check("\0" not in value, f"config.envs: the value of {_show(kv.key)} holds a NUL character")
        size = len(kv.key.encode()) + 1 + len(kv.value) + 1
        _check(
            size <= MAX_ARG_STRLEN,
            f"config.envs: {_show(kv.key)} is {size - 1} bytes, the limit is {MAX_ARG_STRLEN - 1}",
        )
        total += size
    _check(
        total <= MAX_ARGV_ENV_BYTES,
        f"command, args and envs take {total} bytes, the limit is {MAX_ARGV_ENV_BYTES}",
    )
    if config.working_dir:
        _path(config.working_dir, "config.working_dir", dotdot=True)


def _mounts(mounts: Iterable[api_pb2.Mount]) -> None:
    seen: set[str] = set()
    for count, m in enumerate(mounts, 1):
        _check(count <= MAX_MOUNTS, f"more than {MAX_MOUNTS} mounts")
        where = f"mount {_show(m.container_path)}"
        _path(m.container_path, "mount container_path")
        if m.image.image:
            raise Unimplemented(f"{where}: image volume mounts are not supported by pyshim yet")
        _check(not m.image_sub_path, f"{where}: image_sub_path needs an image")
        if m.uidMappings or m.gidMappings:
            raise Unimplemented(f"{where}: id-mapped mounts are not supported by pyshim yet")
        if m.mount_options:
            raise Unimplemented(f"{where}: mount_options are not supported by pyshim yet")
        _path(m.host_path, f"{where}: host_path", dotdot=True)
        _check(
            m.propagation in api_pb2.MountPropagation.values(),
            f"{where}: propagation {m.propagation} is not PRIVATE, HOST_TO_CONTAINER or BIDIRECTIONAL",
        )
        if m.recursive_read_only:
            _check(m.readonly, f"{where}: recursive_read_only needs readonly")
            _check(
                m.propagation == api_pb2.PROPAGATION_PRIVATE,
                f"{where}: recursive_read_only needs PRIVATE propagation",
            )
        path = destination(m.container_path)
        _check(path not in seen, f"{where}: two mounts at the same container path")
        seen.add(path)


def _devices(config: api_pb2.ContainerConfig) -> None:
    _check(len(config.devices) <= MAX_DEVICES, f"{len(config.devices)} devices, the limit is {MAX_DEVICES}")
    for d in config.devices:
        _path(d.container_path, "device container_path")
        _path(d.host_path, f"device {_show(d.container_path)}: host_path", dotdot=True)
        _check(
            bool(_PERMISSIONS.fullmatch(d.permissions)),
            f"device {_show(d.container_path)}: permissions {_show(d.permissions)} must be "
            "letters of 'rwm', each once",
        )
    if config.CDI_devices:
        raise Unimplemented("CDI devices are not supported by pyshim")


def _labels(labels: Mapping[str, str], what: str) -> None:
    _check(len(labels) <= MAX_LABELS, f"{len(labels)} {what}s, the limit is {MAX_LABELS}")
    for key, value in labels.items():
        _check(0 < len(key) <= MAX_LABEL_KEY, f"{what} key {_show(key)} must be 1-{MAX_LABEL_KEY} bytes")
        size = len(value.encode())
        _check(
            size <= MAX_LABEL_VALUE,
            f"{what} {_show(key)}: value is {size} bytes, the limit is {MAX_LABEL_VALUE}",
        )


def _annotations(annotations: Mapping[str, str]) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    _check(
        size <= MAX_ANNOTATIONS_BYTES, f"annotations take {size} bytes, the limit is {MAX_ANNOTATIONS_BYTES}"
    )
    _check(all(annotations), "an annotation has an empty key")


def _log_path(value: str) -> str:
    """Relative to the pod's log directory and staying inside it: no leading '/', no
    empty, '.' or '..' component, printable (a newline would forge log lines elsewhere)."""
    if not value:
        return ""
    _check(len(value.encode()) <= MAX_PATH, f"config.log_path is longer than {MAX_PATH} bytes")
    _check(
        value.isprintable() and all(p not in ("", ".", "..") for p in value.split("/")),
        f"config.log_path {_show(value)} must be a relative path inside the pod's log directory "
        "(no leading '/', no '.', '..' or empty part, no control characters)",
    )
    return value


def command(cmd: Sequence[str], what: str) -> list[str]:
    """A command to run (ExecSync's cmd): not empty, bounded like argv, no NUL."""
    _check(len(cmd) > 0, f"{what} is required: the command and its arguments")
    _check(len(cmd) <= MAX_STRINGS, f"{what} has {len(cmd)} entries, the limit is {MAX_STRINGS}")
    total = 0
    for value in cmd:
        size = len(value.encode()) + 1
        _check(
            size <= MAX_ARG_STRLEN,
            f"an entry of {what} is {size - 1} bytes, the limit is {MAX_ARG_STRLEN - 1}",
        )
        _check("\0" not in value, f"an entry of {what} holds a NUL character")
        total += size
    _check(total <= MAX_ARGV_ENV_BYTES, f"{what} takes {total} bytes, the limit is {MAX_ARGV_ENV_BYTES}")
    return list(cmd)


def _security(sc: api_pb2.LinuxContainerSecurityContext) -> None:
    where = "config.linux.security_context"
    caps = sc.capabilities
    for field_name, names in (
        ("add_capabilities", caps.add_capabilities),
        ("drop_capabilities", caps.drop_capabilities),
        ("add_ambient_capabilities", caps.add_ambient_capabilities),
    ):
        _check(
            len(names) <= MAX_CAPABILITIES, f"{where}.capabilities.{field_name}: more than {MAX_CAPABILITIES}"
        )
        for name in names:
            known = capabilities.canonical(name)
            _check(
                known is not None and not (known == "ALL" and field_name == "add_ambient_capabilities"),
                f"{where}.capabilities.{field_name}: {_show(name)} is not a Linux capability"
                + (" or ALL" if field_name != "add_ambient_capabilities" else ""),
            )
    for field_name in ("run_as_user", "run_as_group"):
        if sc.HasField(field_name):
            value = getattr(sc, field_name).value
            _check(0 <= value <= MAX_ID, f"{where}.{field_name} {value} is not 0-{MAX_ID}")
    _check(
        not sc.HasField("run_as_group") or sc.HasField("run_as_user") or bool(sc.run_as_username),
        f"{where}.run_as_group needs run_as_user or run_as_username",
    )
    if sc.run_as_username:
        _check(
            bool(_USERNAME.fullmatch(sc.run_as_username)),
            f"{where}.run_as_username {_show(sc.run_as_username)} is not a user name",
        )
    _check(len(sc.supplemental_groups) <= MAX_GROUPS, f"{where}.supplemental_groups: more than {MAX_GROUPS}")
    for gid in sc.supplemental_groups:
        _check(0 <= gid <= MAX_ID, f"{where}.supplemental_groups: {gid} is not 0-{MAX_ID}")
    _check(
        sc.supplemental_groups_policy in api_pb2.SupplementalGroupsPolicy.values(),
        f"{where}.supplemental_groups_policy {sc.supplemental_groups_policy} is not Merge or Strict",
    )
    for field_name in ("masked_paths", "readonly_paths"):
        paths = getattr(sc, field_name)
        _check(len(paths) <= MAX_PATH_LIST, f"{where}.{field_name}: more than {MAX_PATH_LIST}")
        for path in paths:
            _path(path, f"{where}.{field_name} entry")
    _seccomp(sc, where)
    _apparmor(sc, where)
    _namespaces(sc.namespace_options, f"{where}.namespace_options")


def _profile_type(profile: api_pb2.SecurityProfile, what: str) -> int:
    _check(
        profile.profile_type in api_pb2.SecurityProfile.ProfileType.values(),
        f"{what}.profile_type {profile.profile_type} is not RuntimeDefault, Unconfined or Localhost",
    )
    return int(profile.profile_type)


def _seccomp(sc: api_pb2.LinuxContainerSecurityContext, where: str) -> None:
    kind = _profile_type(sc.seccomp, f"{where}.seccomp") if sc.HasField("seccomp") else None
    if kind == api_pb2.SecurityProfile.Localhost:
        ref = sc.seccomp.localhost_ref
        _check(bool(ref), f"{where}.seccomp: Localhost needs localhost_ref, the profile's path")
        _path(ref, f"{where}.seccomp.localhost_ref", dotdot=True)
    old = sc.seccomp_profile_path
    if old and old not in _OLD_SECCOMP:
        _check(
            old.startswith("localhost/"),
            f"{where}.seccomp_profile_path {_show(old)} is not runtime/default, docker/default, "
            "unconfined or localhost/<absolute path>",
        )
        _path(old.removeprefix("localhost/"), f"{where}.seccomp_profile_path", dotdot=True)


def _apparmor(sc: api_pb2.LinuxContainerSecurityContext, where: str) -> None:
    kind = _profile_type(sc.apparmor, f"{where}.apparmor") if sc.HasField("apparmor") else None
    if kind == api_pb2.SecurityProfile.Localhost:
        _check(
            bool(_PROFILE_NAME.fullmatch(sc.apparmor.localhost_ref)),
            f"{where}.apparmor: Localhost needs localhost_ref, a profile name "
            f"(printable, no spaces, at most {MAX_PROFILE_NAME})",
        )
    old = sc.apparmor_profile
    if old and old not in ("runtime/default", "unconfined"):
        _check(
            old.startswith("localhost/") and bool(_PROFILE_NAME.fullmatch(old.removeprefix("localhost/"))),
            f"{where}.apparmor_profile {_show(old)} is not runtime/default, unconfined or localhost/<name>",
        )


def _namespaces(opts: api_pb2.NamespaceOption, where: str) -> None:
    modes = {}
    for kind in ("network", "pid", "ipc"):
        value = getattr(opts, kind)
        try:
            modes[kind] = NamespaceMode(value)
        except ValueError:
            raise InvalidArgument(f"{where}.{kind} {value} is not POD, CONTAINER, NODE or TARGET") from None
    for kind in ("network", "ipc"):
        _check(
            modes[kind] in (NamespaceMode.POD, NamespaceMode.NODE),
            f"{where}.{kind} {modes[kind].name} is not POD or NODE",
        )
    if modes["pid"] == NamespaceMode.TARGET:
        _check(bool(opts.target_id), f"{where}: pid mode TARGET needs target_id, the target container's id")
        id_prefix(opts.target_id, f"{where}.target_id")
    if opts.HasField("userns_options"):
        userns = opts.userns_options
        try:
            mode = NamespaceMode(userns.mode)
        except ValueError:
            raise InvalidArgument(
                f"{where}.userns_options.mode {userns.mode} is not a namespace mode"
            ) from None
        _check(
            mode in (NamespaceMode.POD, NamespaceMode.NODE), f"{where}.userns_options.mode is not POD or NODE"
        )
        if mode == NamespaceMode.POD and (userns.uids or userns.gids):
            raise Unimplemented("user namespaces with id mappings are not supported by pyshim yet")


def log_file(log_directory: str, log_path: str) -> str:
    """The container's log file: the (checked) relative log_path inside the pod's log
    directory; "" when either is unset (no log file is written then)."""
    if not log_path or not log_directory:
        return ""
    directory = os.path.normpath(log_directory)
    path = os.path.normpath(os.path.join(directory, log_path))
    _check(path.startswith(directory + "/"), f"log_path {_show(log_path)} leaves the pod's log directory")
    return path
