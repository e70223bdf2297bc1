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

from shim.errors import Internal

LOOPBACK_INDEX = 1
_NLMSG_ERROR = 2
_RT_TABLE_MAIN = 254
_RTPROT_BOOT = 3
_RTN_UNICAST = 1


def _request(sock: socket.socket, msg: Any, kind: int, flags: int, what: str) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | flags
    msg["header"]["sequence_number"] = 1
    msg.encode()
    sock.send(msg.data)
    reply = sock.recv(65536)
    (reply_type,) = struct.unpack_from("H", reply, 4)
    if reply_type == _NLMSG_ERROR:
        # nlmsghdr (16 bytes), then the error code: 0 is a plain acknowledgement.
        (code,) = struct.unpack_from("i", reply, 16)
        if code != 0:
            raise Internal(f"{what} in the pod network namespace: {os.strerror(-code)}")
    return reply


def link_up(sock: socket.socket, index: int = LOOPBACK_INDEX) -> None:
    msg = ifinfmsg()
    msg["index"] = index
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    _request(sock, msg, RTM_NEWLINK, NLM_F_ACK, f"setting link {index} up")


def link_index(sock: socket.socket, name: str) -> int:
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", name)]
    reply = _request(sock, msg, RTM_GETLINK, 0, f"looking up {name}")
    answer = ifinfmsg(reply)
    answer.decode()
    return int(answer["index"])


def add_address(
    sock: socket.socket, index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    msg["prefixlen"] = interface.network.prefixlen
    msg["index"] = index
    address = str(interface.ip)
    msg["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
    if interface.version == 6:
        msg["attrs"] = [("IFA_ADDRESS", address)]
        msg["flags"] = 0x02  # IFA_F_NODAD: the address is ours alone, usable at once
    _request(sock, msg, RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, f"adding {interface}")


def add_default_route(
    sock: socket.socket, index: int, gateway: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    msg = rtmsg()
    msg["family"] = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    msg["dst_len"] = 0
    msg["table"] = _RT_TABLE_MAIN
    msg["proto"] = _RTPROT_BOOT
    msg["scope"] = 0
    msg["type"] = _RTN_UNICAST
    msg["attrs"] = [("RTA_GATEWAY", str(gateway)), ("RTA_OIF", index)]
    _request(
        sock,
        msg,
        RTM_NEWROUTE,
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        f"adding a default route via {gateway}",
    )
