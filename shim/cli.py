"""Command line: `pyshim serve` and friends."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from shim import __version__, validate
from shim.config import (
    DEFAULT_BRIDGE,
    DEFAULT_CGROUP_ROOT,
    DEFAULT_CNI_BIN_DIRS,
    DEFAULT_CNI_CONF_DIR,
    DEFAULT_NETNS_DIR,
    DEFAULT_NFT_TABLE,
    DEFAULT_POD_SUBNET,
    DEFAULT_REGISTRY_CONFIG_DIR,
    DEFAULT_ROOT,
    DEFAULT_RUN_ROOT,
    DEFAULT_RUNTIME_HANDLERS,
    DEFAULT_SOCKET,
    Config,
)
from shim.errors import InvalidArgument, ShimError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyshim", description="A small CRI runtime for Kubernetes nodes.")
    parser.add_argument("--version", action="version", version=f"pyshim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the CRI daemon", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    serve.add_argument(
        "--socket", type=Path, default=DEFAULT_SOCKET, help="unix socket to serve CRI on (created 0660)"
    )
    serve.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="persistent state: sandbox records, images"
    )
    serve.add_argument(
        "--run-root",
        type=Path,
        default=DEFAULT_RUN_ROOT,
        help="runtime state: namespace pins; gone after a reboot",
    )
    serve.add_argument(
        "--netns-dir",
        type=Path,
        default=DEFAULT_NETNS_DIR,
        help="where pod network namespaces are pinned (the dir `ip netns` reads)",
    )
    serve.add_argument(
        "--pause", type=Path, default=None, help="pause executable; unset: the one built into the package"
    )
    serve.add_argument(
        "--runtime-handler",
        action="append",
        dest="runtime_handlers",
        default=None,
        metavar="NAME[=PROGRAM]",
        help="a runtime handler (RuntimeClass handler name) and its OCI runtime (runc, crun or a path; "
        "default: NAME), repeatable; the first is what an empty handler selects; unset: "
        + ", ".join(f"{n}={p}" for n, p in DEFAULT_RUNTIME_HANDLERS),
    )
    serve.add_argument("--conmon", default="conmon", metavar="PROGRAM", help="the container monitor")
    serve.add_argument(
        "--cgroup-root",
        default=DEFAULT_CGROUP_ROOT,
        metavar="PATH",
        help="cgroup under which pods that name no cgroup_parent get one (PATH/<sandbox id>)",
    )
    serve.add_argument(
        "--pause-stop-timeout", type=float, default=2.0, help="seconds between SIGTERM and SIGKILL of a pause"
    )
    serve.add_argument(
        "--pause-start-timeout", type=float, default=10.0, help="seconds to wait for a pause to be ready"
    )
    serve.add_argument("--grpc-workers", type=int, default=32, help="threads serving requests")
    serve.add_argument(
        "--event-subscribers",
        type=int,
        default=8,
        help="GetContainerEvents streams served at once; each holds a request thread (keep it "
        "well below --grpc-workers)",
    )
    serve.add_argument(
        "--event-queue",
        type=int,
        default=1000,
        help="events queued per stream; a stream that falls this far behind is dropped",
    )
    serve.add_argument(
        "--bridge-name", default=DEFAULT_BRIDGE, help="host bridge of the built-in pod network"
    )
    serve.add_argument("--pod-subnet", default=DEFAULT_POD_SUBNET, help="IPv4 subnet pods get addresses from")
    serve.add_argument(
        "--pod-subnet6",
        default="",
        help="optional IPv6 subnet: pods also get an address from it (additional_ips)",
    )
    serve.add_argument(
        "--nft-table", default=DEFAULT_NFT_TABLE, help="pyshim's own nftables table (ip family)"
    )
    serve.add_argument(
        "--no-ip-forward", dest="ip_forward", action="store_false", help="leave net.ipv4.ip_forward as it is"
    )
    serve.add_argument(
        "--no-masquerade",
        dest="masquerade",
        action="store_false",
        help="no SNAT for traffic leaving the pod subnet",
    )
    serve.add_argument(
        "--cni-conf-dir",
        type=Path,
        default=DEFAULT_CNI_CONF_DIR,
        help="CNI network configurations; if one is there, CNI replaces the built-in network",
    )
    serve.add_argument(
        "--cni-bin-dir",
        type=Path,
        action="append",
        dest="cni_bin_dirs",
        metavar="DIR",
        help="where CNI plugins are looked for, repeatable; unset: "
        + ", ".join(map(str, DEFAULT_CNI_BIN_DIRS)),
    )
    serve.add_argument(
        "--insecure-registry",
        action="append",
        dest="insecure_registries",
        metavar="HOST[:PORT]",
        help="a registry to reach over plain HTTP, repeatable (loopback registries always are)",
    )
    serve.add_argument(
        "--registry-config-dir",
        type=Path,
        default=DEFAULT_REGISTRY_CONFIG_DIR,
        help="per-registry mirrors, TLS and credentials: DIR/<host>/hosts.toml, as containerd's certs.d",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--stream-address",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address of the streaming server that Exec, Attach and PortForward URLs point to",
    )
    serve.add_argument(
        "--stream-port", type=int, default=0, metavar="PORT", help="its port; 0: an ephemeral one"
    )
    serve.add_argument(
        "--stream-tls-cert",
        type=Path,
        default=None,
        metavar="FILE",
        help="serve streams over TLS: certificate",
    )
    serve.add_argument(
        "--stream-tls-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="serve streams over TLS: private key",
    )
    serve.add_argument(
        "--metrics-address",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics; unset: no metrics",
    )
    serve.add_argument(
        "--fail-at",
        action="append",
        default=None,
        metavar="STEP",
        help="for tests, repeatable: make every call fail at STEP (RunPodSandbox: mkdir, cgroup, spawn, "
        "pin, shm, network, save, commit; CreateContainer: container-mkdir, -rootfs, -spec, -create, "
        "-save; StartContainer: container-start), with crash:STEP kill the daemon there, with undo:NAME "
        "make that undo step fail",
    )
    images = commands.add_parser("images", help="manage the image store without a registry")
    image_commands = images.add_subparsers(dest="images_command", required=True)
    importer = image_commands.add_parser(
        "import", help="import an OCI image layout tar or a `docker save` tar (air-gapped nodes)"
    )
    importer.add_argument("file", type=Path, help="the archive (plain or gzip-compressed tar)")
    importer.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the daemon's --root")
    importer.add_argument("--name", default="", help="name:tag for the image, instead of the archive's own")
    return parser


def _import(args: argparse.Namespace) -> int:
    from shim.images.importer import import_file
    from shim.images.store import ImageStore

    setup_logging("warning")
    try:
        records = import_file(ImageStore(args.root.absolute() / "images", owner=False), args.file, args.name)
    except ShimError as exc:
        print(f"pyshim: import failed: {exc}", file=sys.stderr)
        return 1
    for record in records:
        print(record.id, *record.repo_tags)
    return 0


def _config(args: argparse.Namespace) -> Config:
    return Config(
        socket=args.socket.absolute(),
        root=args.root.absolute(),
        run_root=args.run_root.absolute(),
        netns_dir=args.netns_dir.absolute(),
        pause_path=args.pause.absolute() if args.pause else None,
        runtime_handlers=_handlers(args.runtime_handlers)
        if args.runtime_handlers
        else DEFAULT_RUNTIME_HANDLERS,
        conmon=args.conmon,
        cgroup_root=validate.cgroup_path(args.cgroup_root, "--cgroup-root") or DEFAULT_CGROUP_ROOT,
        pause_stop_timeout=args.pause_stop_timeout,
        pause_start_timeout=args.pause_start_timeout,
        grpc_workers=args.grpc_workers,
        event_subscribers=args.event_subscribers,
        event_queue=args.event_queue,
        bridge_name=args.bridge_name,
        pod_subnet=args.pod_subnet,
        pod_subnet6=args.pod_subnet6,
        nft_table=args.nft_table,
        ip_forward=args.ip_forward,
        masquerade=args.masquerade,
        cni_conf_dir=args.cni_conf_dir.absolute(),
        cni_bin_dirs=tuple(args.cni_bin_dirs or DEFAULT_CNI_BIN_DIRS),
        insecure_registries=tuple(args.insecure_registries or ()),
        registry_config_dir=args.registry_config_dir.absolute(),
        fail_at=tuple(args.fail_at or ()),
        log_level=args.log_level,
        stream_address=args.stream_address,
        stream_port=args.stream_port,
        stream_tls_cert=args.stream_tls_cert.absolute() if args.stream_tls_cert else None,
        stream_tls_key=args.stream_tls_key.absolute() if args.stream_tls_key else None,
        metrics_address=args.metrics_address,
    )


def _handlers(values: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        name, _, program = value.partition("=")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
            raise InvalidArgument(f"--runtime-handler {value!r}: the name must be a lowercase DNS label")
        pairs.append((name, program or name))
    return tuple(pairs)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    # pyroute2 logs every netlink message at debug level: pyshim's own debug lines only.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from shim.server import serve

        setup_logging(args.log_level)
        log = logging.getLogger("shim")
        try:
            return serve(_config(args))
        except ShimError as exc:
            log.error("event=cannot_start reason=%r", str(exc))
            return 1
        except Exception as exc:  # a missing pause, a bad flag value, a socket gRPC cannot bind...
            log.error("event=cannot_start reason=%r", f"{type(exc).__name__}: {exc}")
            log.debug("event=cannot_start_traceback", exc_info=True)
            return 1
    if args.command == "images" and args.images_command == "import":
        return _import(args)
    return 2
