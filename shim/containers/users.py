"""The user a container runs as: the CRI security context over the image's `User`,
names resolved from the image's own /etc/passwd and /etc/group (read inside the
root filesystem, never the node's), as containerd does it:

- `run_as_username`, else `run_as_user`, else the image's "user[:group]", else root;
- the group: `run_as_group` if set, else the image's group part (only when the image
  user is used), else the user's primary group from /etc/passwd, else 0;
- additional groups: the primary group, then (policy Merge, the default) every group
  of /etc/group that lists the user's name as a member, then `supplemental_groups`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shim._proto import api_pb2
from shim.containers import rootpath
from shim.errors import FailedPrecondition

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
MAX_ID_FILE = 4 * 1024 * 1024  # an /etc/passwd or /etc/group larger than this is refused
_NUMBER = re.compile(r"[0-9]{1,10}")
_DIGITS = re.compile(r"[0-9]+")  # an image's numeric user or group, range checked after


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]  # the primary gid first, no duplicates
    username: str  # from the image's /etc/passwd; "" if the uid has no entry


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def parse_passwd(text: str) -> list[PasswdEntry]:
    """name:password:uid:gid:... lines; malformed lines and NIS (+/-) lines are skipped,
    as libc's files backend does."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[0] or fields[0][0] in "+-#":
            continue
        if _NUMBER.fullmatch(fields[2]) and _NUMBER.fullmatch(fields[3]):
            entries.append(PasswdEntry(fields[0], int(fields[2]), int(fields[3])))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    """name:password:gid:member,member lines; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 3 or not fields[0] or fields[0][0] in "+-#" or not _NUMBER.fullmatch(fields[2]):
            continue
        members = tuple(m for m in (fields[3].split(",") if len(fields) > 3 else []) if m)
        entries.append(GroupEntry(fields[0], int(fields[2]), members))
    return entries


class _Image:
    """The image's user database, read lazily (most containers never need it)."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs
        self._passwd: list[PasswdEntry] | None = None
        self._group: list[GroupEntry] | None = None

    def _read(self, path: str) -> str:
        data = rootpath.read_file(self.rootfs, path, MAX_ID_FILE)
        return "" if data is None else data.decode("utf-8", errors="replace")

    @property
    def passwd(self) -> list[PasswdEntry]:
        if self._passwd is None:
            self._passwd = parse_passwd(self._read("/etc/passwd"))
        return self._passwd

    @property
    def group(self) -> list[GroupEntry]:
        if self._group is None:
            self._group = parse_group(self._read("/etc/group"))
        return self._group

    def user_named(self, name: str) -> PasswdEntry:
        for entry in self.passwd:
            if entry.name == name:
                return entry
        raise FailedPrecondition(f"user {name[:80]!r} is not in the image's /etc/passwd")

    def user_with_uid(self, uid: int) -> PasswdEntry | None:
        return next((e for e in self.passwd if e.uid == uid), None)

    def group_named(self, name: str) -> int:
        for entry in self.group:
            if entry.name == name:
                return entry.gid
        raise FailedPrecondition(f"group {name[:80]!r} is not in the image's /etc/group")


def resolve(rootfs: Path, sc: api_pb2.LinuxContainerSecurityContext, image_user: str) -> User:
    """The process user for a container with security context `sc` whose image says
    `image_user` (OCI config `User`). FailedPrecondition names a user or group that the
    image's files do not have, or an image `User` that is malformed."""
    image = _Image(rootfs)
    group: int | None = sc.run_as_group.value if sc.HasField("run_as_group") else None
    if sc.run_as_username:
        entry = image.user_named(sc.run_as_username)
        uid, primary, username = entry.uid, entry.gid, entry.name
    elif sc.HasField("run_as_user"):
        uid = sc.run_as_user.value
        found = image.user_with_uid(uid)
        primary, username = (found.gid, found.name) if found else (0, "")
    else:
        uid, primary, username, image_group = _image_user(image, image_user)
        if group is None:
            group = image_group
    gid = primary if group is None else group
    gids = [gid]
    if username and sc.supplemental_groups_policy != api_pb2.Strict:
        # Groups named after the user are its primary group, not a supplemental one.
        gids += [g.gid for g in image.group if username in g.members and g.name != username]
    gids += list(sc.supplemental_groups)
    return User(uid=uid, gid=gid, additional_gids=tuple(dict.fromkeys(gids)), username=username)


def _image_user(image: _Image, spec: str) -> tuple[int, int, str, int | None]:
    """(uid, primary gid, username, group or None) for an image's "user[:group]"."""
    if not spec:  # root, group 0 whatever /etc/passwd says (containerd's default spec)
        found = image.user_with_uid(0)
        return 0, 0, found.name if found else "", None
    user, sep, group = spec.partition(":")
    if not user or (sep and not group) or ":" in group or not spec.isprintable():
        raise FailedPrecondition(f"the image's user {spec[:80]!r} is not user[:group]")
    if _DIGITS.fullmatch(user):
        uid = _number(user, "user")
        found = image.user_with_uid(uid)
        primary, username = (found.gid, found.name) if found else (0, "")
    else:
        entry = image.user_named(user)
        uid, primary, username = entry.uid, entry.gid, entry.name
    if not sep:
        return uid, primary, username, None
    gid = _number(group, "group") if _DIGITS.fullmatch(group) else image.group_named(group)
    return uid, primary, username, gid


def _number(text: str, what: str) -> int:
    value = int(text)
    if value > MAX_ID:
        raise FailedPrecondition(f"the image's {what} id {value} is out of range (at most {MAX_ID})")
    return value
