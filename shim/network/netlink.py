"""The few rtnetlink requests a pod's network namespace needs, sent on a socket
opened inside that namespace (the pause opens it there and hands it over).

Each request is one encoded pyroute2 message and one acknowledgement: a whole
IPRoute object costs ~2 ms per pod here, a request ~0.1 ms.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from shim.errors import NetlinkRefused

LOOPBACK_INDEX = 1
_NLMSG_ERROR = 2
_RT_TABLE_MAIN = 254
_RTPROT_BOOT = 3
_RTN_UNICAST = 1


def _encode(msg: Any, kind: int, flags: int, sequence: int) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | flags
    msg["header"]["sequence_number"] = sequence
    msg.encode()
    return bytes(msg.data)


def _request(sock: socket.socket, msg: Any, kind: int, flags: int, what: str) -> bytes:
    sock.send(_encode(msg, kind, flags, 1))
    reply = sock.recv(65536)
    (reply_type,) = struct.unpack_from("H", reply, 4)
    if reply_type == _NLMSG_ERROR:
        # nlmsghdr (16 bytes), then the error code: 0 is a plain acknowledgement.
        (code,) = struct.unpack_from("i", reply, 16)
        if code != 0:
            raise NetlinkRefused(f"{what}: {os.strerror(-code)}", -code)
    return reply


def batch(sock: socket.socket, requests: list[tuple[Any, int, int, str]]) -> None:
    """Several requests in one send, then their acknowledgements: one round trip."""
    payload = b"".join(
        _encode(msg, kind, flags | NLM_F_ACK, seq) for seq, (msg, kind, flags, _) in enumerate(requests, 1)
    )
    sock.send(payload)
    pending = {seq: what for seq, (_, _, _, what) in enumerate(requests, 1)}
    while pending:
        reply = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(reply):
            length, kind, _, seq, _ = struct.unpack_from("IHHII", reply, offset)
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("i", reply, offset + 16)
                what = pending.pop(seq, "netlink request")
                if code != 0:
                    raise NetlinkRefused(f"{what}: {os.strerror(-code)}", -code)
            offset += (length + 3) & ~3


def link_up(sock: socket.socket, index: int = LOOPBACK_INDEX) -> None:
    _request(sock, *_link_up(index), NLM_F_ACK, f"setting link {index} up in the pod network namespace")


def _link_up(index: int) -> tuple[Any, int]:
    msg = ifinfmsg()
    msg["index"] = index
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    return msg, RTM_NEWLINK


def _address(index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> tuple[Any, int]:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    msg["prefixlen"] = interface.network.prefixlen
    msg["index"] = index
    address = str(interface.ip)
    msg["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
    if interface.version == 6:
        msg["attrs"] = [("IFA_ADDRESS", address)]
        msg["flags"] = 0x02  # IFA_F_NODAD: the address is ours alone, usable at once
    return msg, RTM_NEWADDR


def _default_route(index: int, gateway: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[Any, int]:
    msg = rtmsg()
    msg["family"] = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    msg["dst_len"] = 0
    msg["table"] = _RT_TABLE_MAIN
    msg["proto"] = _RTPROT_BOOT
    msg["scope"] = 0
    msg["type"] = _RTN_UNICAST
    msg["attrs"] = [("RTA_GATEWAY", str(gateway)), ("RTA_OIF", index)]
    return msg, RTM_NEWROUTE


def configure_interface(
    sock: socket.socket,
    index: int,
    addresses: list[
        tuple[
            ipaddress.IPv4Interface | ipaddress.IPv6Interface, ipaddress.IPv4Address | ipaddress.IPv6Address
        ]
    ],
) -> None:
    """Addresses, link up, a default route per address family: in one round trip."""
    create = NLM_F_CREATE | NLM_F_EXCL
    requests: list[tuple[Any, int, int, str]] = [
        (*_address(index, interface), create, f"adding {interface} in the pod network namespace")
        for interface, _ in addresses
    ]
    requests.append((*_link_up(index), 0, "setting eth0 up in the pod network namespace"))
    requests += [
        (*_default_route(index, gateway), create, f"adding a default route via {gateway} in the pod")
        for _, gateway in addresses
    ]
    batch(sock, requests)


def link_index(sock: socket.socket, name: str) -> int:
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", name)]
    reply = _request(sock, msg, RTM_GETLINK, 0, f"looking up {name} in the pod network namespace")
    answer = ifinfmsg(reply)
    answer.decode()
    return int(answer["index"])


def add_veth(
    sock: socket.socket, host_name: str, master: int, peer_name: str, peer_index: int, peer_netns_fd: int
) -> None:
    """A veth pair: `host_name` up on bridge `master`, its peer created inside the
    namespace of `peer_netns_fd` with a chosen name and index. One request."""
    msg = ifinfmsg()
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    peer = {"index": peer_index, "attrs": [("IFLA_IFNAME", peer_name), ("IFLA_NET_NS_FD", peer_netns_fd)]}
    msg["attrs"] = [
        ("IFLA_IFNAME", host_name),
        ("IFLA_MASTER", master),
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "veth"),
                    ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
                ]
            },
        ),
    ]
    _request(sock, msg, RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, f"creating veth {host_name}")


def open_socket() -> socket.socket:
    """A NETLINK_ROUTE socket in the caller's (the host's) network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
    sock.bind((0, 0))
    return sock
