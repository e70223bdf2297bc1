"""The pod's resolv.conf, hostname and hosts files, written into the sandbox's
runtime dir for containers to mount."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shim.store import write_atomically

HOST_RESOLV_CONF = Path("/etc/resolv.conf")


@dataclass(frozen=True, slots=True)
class DnsConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def resolv_conf(dns: DnsConfig) -> bytes:
    """From the pod's dns_config; the host's file when none is given."""
    if not (dns.servers or dns.searches or dns.options):
        try:
            return HOST_RESOLV_CONF.read_bytes()
        except OSError:
            return b""
    lines = []
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    lines += [f"nameserver {server}" for server in dns.servers]
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return ("\n".join(lines) + "\n").encode()


def hosts(hostname: str, ip: str | None) -> bytes:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    if ip and hostname:
        lines.append(f"{ip}\t{hostname}")
    return ("\n".join(lines) + "\n").encode()


def write_pod_files(directory: Path, hostname: str, ip: str | None, dns: DnsConfig) -> dict[str, str]:
    """Write the three files; returns their paths by name."""
    files = {
        "resolv.conf": resolv_conf(dns),
        "hostname": f"{hostname}\n".encode() if hostname else b"",
        "hosts": hosts(hostname, ip),
    }
    paths = {}
    for name, content in files.items():
        path = directory / name
        write_atomically(path, content, durable=False)
        path.chmod(0o644)
        paths[name] = str(path)
    return paths
