"""Command line: `pyshim serve` and friends."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shim import __version__
from shim.configfile import add_flags, dump, effective, file_to_read
from shim.errors import ShimError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyshim", description="A small CRI runtime for Kubernetes nodes.")
    parser.add_argument("--version", action="version", version=f"pyshim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    # serve and config dump take the same settings: the flags are made once, from Config.
    settings = argparse.ArgumentParser(add_help=False)
    add_flags(settings)

    commands.add_parser("serve", parents=[settings], help="run the CRI daemon")
    config = commands.add_parser("config", help="the daemon's configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser(
        "dump",
        parents=[settings],
        help="print the effective configuration (defaults < config file < flags) as TOML",
    )

    images = commands.add_parser("images", help="manage the image store without a registry")
    image_commands = images.add_subparsers(dest="images_command", required=True)
    importer = image_commands.add_parser(
        "import", help="import an OCI image layout tar or a `docker save` tar (air-gapped nodes)"
    )
    importer.add_argument("file", type=Path, help="the archive (plain or gzip-compressed tar)")
    importer.add_argument(
        "--root",
        type=Path,
        default=None,
        help="the daemon's root (default: the config file's, else /var/lib/pyshim)",
    )
    importer.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="the daemon's config file, for its root"
    )
    importer.add_argument("--name", default="", help="name:tag for the image, instead of the archive's own")
    return parser


def _import(args: argparse.Namespace) -> int:
    from shim.images.importer import import_file
    from shim.images.store import ImageStore

    setup_logging("warning")
    try:
        # The store the daemon uses: its --root if given here, else the one its config file names.
        root = args.root.absolute() if args.root else effective(argparse.Namespace(config=args.config)).root
        records = import_file(ImageStore(root / "images", owner=False), args.file, args.name)
    except ShimError as exc:
        print(f"pyshim: import failed: {exc}", file=sys.stderr)
        return 1
    for record in records:
        print(record.id, *record.repo_tags)
    return 0


def _dump(args: argparse.Namespace) -> int:
    try:
        source = file_to_read(args.config)
        text = dump(effective(args))
    except ShimError as exc:
        print(f"pyshim: config: {exc}", file=sys.stderr)
        return 1
    # A comment, so that the output stays a config file that reads back the same.
    print(f"# pyshim {__version__}: built-in defaults < {source or 'no config file'} < flags given")
    sys.stdout.write(text)
    return 0


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
        return _serve(args)
    if args.command == "config" and args.config_command == "dump":
        return _dump(args)
    if args.command == "images" and args.images_command == "import":
        return _import(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from shim.server import serve

    log = logging.getLogger("shim")
    try:
        # Before anything else: a bad file or flag must stop the daemon before it touches the node.
        config = effective(args)
    except ShimError as exc:
        setup_logging("info")
        log.error("event=cannot_start reason=%r", str(exc))
        return 1
    setup_logging(config.log_level)
    try:
        return serve(config)
    except ShimError as exc:
        log.error("event=cannot_start reason=%r", str(exc))
        return 1
    except Exception as exc:  # a missing pause, a bad flag value, a socket gRPC cannot bind...
        log.error("event=cannot_start reason=%r", f"{type(exc).__name__}: {exc}")
        log.debug("event=cannot_start_traceback", exc_info=True)
        return 1
