"""Pod IP allocation: one file per allocated address, written atomically.

An address is handed out at most once: allocation happens under one lock, is
persisted before it is used, and the files are reloaded on start. Addresses are
taken round-robin, so a just-released address is the last to be reused.
Reconciliation frees what no live sandbox owns (e.g. a crash between allocation
and the sandbox record).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from pathlib import Path

from shim.errors import ResourceExhausted
from shim.store import is_id, write_atomically

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Ipam:
    def __init__(self, directory: Path, subnet: IPNetwork, gateway: IPAddress) -> None:
        self.directory = directory
        self.subnet = subnet
        self.gateway = gateway
        self._lock = threading.Lock()
        self._owners: dict[IPAddress, str] = {}
        self._by_owner: dict[str, IPAddress] = {}
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Hosts of a /16 are 65k: walk them lazily from a cursor, never list them all.
        self._first = int(subnet.network_address) + 1
        self._last = int(subnet.broadcast_address) - (1 if subnet.version == 4 else 0)
        self._cursor = self._first
        self._load()

    def _load(self) -> None:
        for path in self.directory.iterdir():
            try:
                address = ipaddress.ip_address(path.name)
                owner = path.read_text().strip()
            except (ValueError, OSError):
                continue
            if address in self.subnet and is_id(owner):
                self._owners[address] = owner
                self._by_owner[owner] = address
            else:
                path.unlink(missing_ok=True)

    def allocate(self, owner: str) -> IPAddress:
        """The owner's address: its existing one, or the next free one, persisted."""
        with self._lock:
            if owner in self._by_owner:
                return self._by_owner[owner]
            # Among len(owners) + 2 consecutive candidates one is free (or the gateway is).
            for _ in range(min(self._last - self._first + 1, len(self._owners) + 2)):
                candidate = ipaddress.ip_address(self._cursor)
                self._cursor = self._first if self._cursor >= self._last else self._cursor + 1
                if candidate != self.gateway and candidate not in self._owners:
                    # No fsync: the dir is on the run root (tmpfs). Allocations must survive a
                    # daemon crash, which they do; after a reboot no pod is alive to own one.
                    write_atomically(self.directory / str(candidate), owner.encode(), durable=False)
                    self._owners[candidate] = owner
                    self._by_owner[owner] = candidate
                    return candidate
        raise ResourceExhausted(
            f"no free pod address left in {self.subnet}: remove pods, or give pyshim a larger --pod-subnet"
        )

    def free(self) -> int:
        """How many more addresses can be handed out."""
        with self._lock:
            return self._last - self._first + 1 - len(self._owners) - 1  # the gateway is never handed out

    def release(self, owner: str) -> None:
        """Idempotent: an owner without an address is fine."""
        with self._lock:
            address = self._by_owner.pop(owner, None)
            if address is None:
                return
            del self._owners[address]
            (self.directory / str(address)).unlink(missing_ok=True)

    def reconcile(self, live: dict[str, str]) -> None:
        """Claim each live sandbox's recorded address (a crash may have freed its file);
        free every address whose owner is not a live sandbox."""
        with self._lock:
            for owner, text in live.items():
                address = ipaddress.ip_address(text)
                if address in self.subnet and self._owners.get(address) in (None, owner):
                    write_atomically(self.directory / str(address), owner.encode(), durable=False)
                    self._owners[address] = owner
                    self._by_owner[owner] = address
            stale = [owner for owner in self._by_owner if owner not in live]
        for owner in stale:
            log.warning("event=ip_reclaimed sandbox=%s ip=%s", owner, self._by_owner.get(owner))
            self.release(owner)

    def allocated(self) -> dict[str, str]:
        with self._lock:
            return {owner: str(address) for owner, address in self._by_owner.items()}
