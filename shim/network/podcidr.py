"""The pod CIDR kubelet hands over (UpdateRuntimeConfig) and the subnet the built-in
network uses, kept across restarts in `<root>/network.json`.

The subnet is the operator's (--pod-subnet / `pod_subnet`) when given; else the
last one kubelet sent that could be taken; else the default. A new subnet is only
taken while no pod holds an address on the bridge: addresses of the old range
would otherwise sit on a bridge without their gateway. Until then it waits as
pending, and is taken by the first pod set-up that finds the bridge empty.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from shim.errors import InvalidArgument
from shim.store import write_atomically

log = logging.getLogger(__name__)

FILE = "network.json"
# A bridge needs a gateway and at least one pod; kubelet's node CIDRs are /24 or so.
MIN_PREFIX, MAX_PREFIX = 8, 30


@dataclass(frozen=True, slots=True)
class PodCidr:
    sent: str = ""  # what kubelet sent last, as sent
    subnet: str = ""  # the IPv4 subnet taken from it ("" until one was)

    @classmethod
    def load(cls, root: Path) -> PodCidr:
        try:
            raw = json.loads((root / FILE).read_bytes())
            return cls(sent=str(raw.get("podCIDR", "")), subnet=str(raw.get("subnet", "")))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("event=network_state_unreadable file=%s reason=%r", root / FILE, str(exc))
            return cls()

    def save(self, root: Path) -> None:
        payload = json.dumps({"version": 1, "podCIDR": self.sent, "subnet": self.subnet}, sort_keys=True)
        write_atomically(root / FILE, payload.encode())


def ipv4_subnet(pod_cidr: str) -> ipaddress.IPv4Network | None:
    """The IPv4 range of a pod CIDR as kubelet sends it ("10.244.1.0/24" or a
    comma-separated dual-stack pair); None if it names only IPv6 ones."""
    found: ipaddress.IPv4Network | None = None
    parts = [p.strip() for p in pod_cidr.split(",") if p.strip()]
    if len(parts) > 2:
        raise InvalidArgument(f"pod CIDR {pod_cidr[:100]!r}: at most one IPv4 and one IPv6 range")
    for part in parts:
        try:
            network = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise InvalidArgument(f"pod CIDR {part[:60]!r} is not an IP range") from None
        if isinstance(network, ipaddress.IPv4Network):
            if found is not None:
                raise InvalidArgument(f"pod CIDR {pod_cidr[:100]!r} names two IPv4 ranges")
            if not MIN_PREFIX <= network.prefixlen <= MAX_PREFIX:
                raise InvalidArgument(
                    f"pod CIDR {part}: the prefix must be /{MIN_PREFIX} to /{MAX_PREFIX} "
                    "(room for a gateway and pods)"
                )
            found = network
    return found
