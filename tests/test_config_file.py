"""The config file: TOML -> Config, precedence against flags, errors naming the key,
`pyshim config dump` reading back as the same Config, and real daemons started from a
file alone."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
from conftest import Daemon
from hypothesis import given
from hypothesis import strategies as st

from shim import cli, configfile
from shim._proto import api_pb2
from shim.config import Config
from shim.configfile import SPECS, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def effective(*flags: str) -> Config:
    """The Config `pyshim serve FLAGS` would run with (the same parsing as the daemon's)."""
    return configfile.effective(cli._parser().parse_args(["serve", *flags]))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_node_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's /etc/pyshim/config.toml, if any, must not colour these tests."""
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "config.toml")


# ---- file -> Config --------------------------------------------------------------------------


def test_a_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "config.toml",
        """
        socket = "/run/x/x.sock"
        root = "state"                       # relative: next to the file
        pause = "/usr/local/bin/pause"
        runtime_handlers = [{ name = "runc", program = "/usr/bin/runc" }, { name = "crun" }]
        cgroup_root = "//kube//pods/"
        pause_stop_timeout = 3               # an integer is a number of seconds too
        grpc_workers = 4
        ip_forward = false
        cni_bin_dirs = ["/a", "b"]
        insecure_registries = ["reg:5000"]
        log_level = "debug"
        stream_port = 10010
        """.replace("        ", ""),
    )
    config = effective("--config", str(conf))
    assert config == dataclasses.replace(
        Config(),
        socket=Path("/run/x/x.sock"),
        root=tmp_path / "state",
        pause_path=Path("/usr/local/bin/pause"),
        runtime_handlers=(("runc", "/usr/bin/runc"), ("crun", "crun")),
        cgroup_root="/kube/pods",
        pause_stop_timeout=3.0,
        grpc_workers=4,
        ip_forward=False,
        cni_bin_dirs=(Path("/a"), tmp_path / "b"),
        insecure_registries=("reg:5000",),
        log_level="debug",
        stream_port=10010,
    )
    assert isinstance(config.pause_stop_timeout, float)


def test_relative_paths_are_the_files_neighbours_whatever_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "etc" / "config.toml", 'root = "lib"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert effective("--config", "../etc/config.toml").root == tmp_path / "elsewhere/../etc/lib"
    # On the command line a relative path is the cwd's, as it always was.
    assert effective("--root", "lib").root == tmp_path / "elsewhere" / "lib"


def test_flags_given_override_the_file_and_defaults_do_not(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "c.toml",
        'socket = "/f.sock"\nip_forward = false\nmasquerade = false\ncni_bin_dirs = ["/f1", "/f2"]\n'
        'runtime_handlers = [{ name = "runc" }]\nlog_level = "error"\n',
    )
    from_file = effective("--config", str(conf))
    assert (from_file.socket, from_file.ip_forward, from_file.log_level) == (Path("/f.sock"), False, "error")
    both = effective(
        "--config",
        str(conf),
        "--socket",
        "/flag.sock",
        "--ip-forward",
        "--cni-bin-dir",
        "/c",
        "--runtime-handler",
        "crun=/usr/bin/crun",
    )
    assert both.socket == Path("/flag.sock")
    assert both.ip_forward is True and both.masquerade is False  # only what was given
    assert both.cni_bin_dirs == (Path("/c"),)  # a repeated flag replaces the file's list
    assert both.runtime_handlers == (("crun", "/usr/bin/crun"),)
    assert both.log_level == "error"  # a flag's default never beats the file
    assert effective("--config", str(conf), "--no-masquerade", "--masquerade").masquerade is True


def test_the_default_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert effective() == Config()  # absent: fine, the defaults
    node_file = write(tmp_path / "node.toml", "grpc_workers = 7\n")
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG_FILE", node_file)
    assert effective().grpc_workers == 7
    assert effective("--config", os.devnull).grpc_workers == 32  # an operator's way to read none
    (tmp_path / "dangling.toml").symlink_to(tmp_path / "nowhere.toml")
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG_FILE", tmp_path / "dangling.toml")
    with pytest.raises(ConfigError, match=r"dangling\.toml: cannot read"):
        effective()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sokcet = 1\n", 'unknown key "sokcet" (did you mean "socket"?)'),
        ('run-root = "/x"\n', 'unknown key "run-root" (did you mean "run_root"?)'),
        ('[pyshim]\nsocket = "/x"\n', 'unknown key "pyshim"'),
        ('runtime_handlers = [{ name = "a", progam = "b" }]\n', 'unknown key "runtime_handlers[0].progam"'),
        ("socket = 5\n", "socket must be a string (a path), not an integer (5)"),
        ('socket = ""\n', "socket must be a path, not an empty string"),
        ('grpc_workers = "4"\n', "grpc_workers must be an integer, not a string ('4')"),
        ("grpc_workers = true\n", "grpc_workers must be an integer, not a boolean (True)"),
        ("grpc_workers = 2.5\n", "grpc_workers must be an integer, not a float (2.5)"),
        ("grpc_workers = 0\n", "grpc_workers must be at least 1, not 0"),
        ("stream_port = 70000\n", "stream_port must be from 0 to 65535, not 70000"),
        ("pause_stop_timeout = nan\n", "pause_stop_timeout must be a finite number"),
        ('ip_forward = "no"\n', "ip_forward must be a boolean (true or false), not a string ('no')"),
        ('cni_bin_dirs = "/opt/cni/bin"\n', "cni_bin_dirs must be an array, not a string"),
        ("insecure_registries = [1]\n", "insecure_registries[0] must be a string, not an integer (1)"),
        ('log_level = "loud"\n', "log_level must be one of debug, info, warning, error, not 'loud'"),
        ('cgroup_root = "relative"\n', "cgroup_root 'relative' must be an absolute cgroupfs path"),
        ("runtime_handlers = []\n", "runtime_handlers must name at least one runtime handler"),
        ('runtime_handlers = [{ program = "runc" }]\n', "runtime_handlers[0] has no name"),
        ('runtime_handlers = ["runc"]\n', "runtime_handlers[0] must be a table"),
        ('runtime_handlers = [{ name = "Big" }]\n', "handler name 'Big' must be a lowercase DNS label"),
        ('runtime_handlers = [{ name = "a" }, { name = "a" }]\n', "a handler is named twice"),
        ("socket = \n", "not valid TOML: Invalid value (at line 1, column 10)"),
        (b"\xff", "not valid TOML: not UTF-8"),
    ],
)
def test_a_wrong_file_is_one_line_naming_the_key(tmp_path: Path, text: str | bytes, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as raised:
        effective("--config", str(conf))
    assert str(raised.value).startswith(f"{conf}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"--config {tmp_path}/nope.toml: no such file"):
        effective("--config", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        effective("--config", str(tmp_path))


def test_flags_obey_the_same_rules() -> None:
    for flags, message in (
        (["--grpc-workers", "0"], "--grpc-workers must be at least 1"),
        (["--runtime-handler", "Bad"], "--runtime-handler: handler name 'Bad'"),
        (["--cgroup-root", "x"], "--cgroup-root 'x' must be an absolute"),
        (["--pause-start-timeout", "inf"], "--pause-start-timeout must be a finite number"),
    ):
        with pytest.raises(ConfigError, match=message):
            effective(*flags)


# ---- every setting is a key, a flag, documented ---------------------------------------------


def test_every_config_field_is_a_setting_with_a_key_and_a_flag() -> None:
    assert [spec.name for spec in SPECS] == [f.name for f in dataclasses.fields(Config)]
    keys = [spec.key for spec in SPECS]
    assert len(set(keys)) == len(keys) and all(k.isidentifier() and k.islower() for k in keys)
    serve = cli._parser().parse_args(["serve"])
    assert not {spec.name for spec in SPECS} & set(vars(serve)), "a flag not given must leave no value"


def test_the_example_file_has_every_key_at_its_default() -> None:
    example = ROOT / "deploy" / "config.toml"
    assert effective("--config", str(example)) == Config()
    text = example.read_text()
    missing = [s.key for s in SPECS if f"\n{s.key} = " not in text and f"\n# {s.key} = " not in text]
    assert missing == []


def test_the_docs_table_names_every_flag_and_key() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    rows = [line for line in docs.splitlines() if line.startswith("| `--")]
    for spec in SPECS:
        assert any(f"`{spec.flag}" in row and f"`{spec.key}`" in row for row in rows), spec.key


# ---- dump ------------------------------------------------------------------------------------


def dumped(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["config", "dump", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dump_prints_the_effective_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(tmp_path / "c.toml", 'socket = "/f.sock"\nnft_table = "from_file"\n')
    code, out, err = dumped(capsys, "--config", str(conf), "--nft-table", "from_flag", "--pause", "/p")
    assert (code, err) == (0, "")
    assert out.startswith("# pyshim ") and f"< {conf} <" in out.splitlines()[0]
    table = tomllib.loads(out)
    assert (table["socket"], table["nft_table"], table["pause"]) == ("/f.sock", "from_flag", "/p")
    again = write(tmp_path / "again.toml", out)
    assert effective("--config", str(again)) == effective(
        "--config", str(conf), "--nft-table", "from_flag", "--pause", "/p"
    )
    code, out, err = dumped(capsys, "--config", str(write(tmp_path / "bad.toml", "x = 1\n")))
    assert (code, out) == (1, "") and err == f'pyshim: config: {tmp_path}/bad.toml: unknown key "x"\n'


_text = st.text(max_size=20)
_paths = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=8), min_size=1
).map(lambda parts: Path("/", *parts))
_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)
_seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
_STRATEGIES: dict[str, st.SearchStrategy[object]] = {
    "cgroup_root": st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1).map(
        lambda parts: "/" + "/".join(parts)
    ),
    "runtime_handlers": st.lists(st.tuples(_names, _text), min_size=1, unique_by=lambda p: p[0]).map(
        lambda pairs: tuple((name, program or name) for name, program in pairs)
    ),
    "pause_oom_score_adj": st.integers(-1000, 1000),
    "grpc_workers": st.integers(1, 1000),
    "event_subscribers": st.integers(1, 1000),
    "event_queue": st.integers(1, 1_000_000),
    "stream_port": st.integers(0, 65535),
    "log_level": st.sampled_from(["debug", "info", "warning", "error"]),
}
_BY_TYPE: dict[object, st.SearchStrategy[object]] = {
    str: _text,
    Path: _paths,
    Path | None: st.none() | _paths,
    float: _seconds,
    bool: st.booleans(),
    tuple[str, ...]: st.lists(_text).map(tuple),
    tuple[Path, ...]: st.lists(_paths).map(tuple),
}
_HINTS = get_type_hints(Config)
_configs = st.builds(
    Config,
    **{name: _STRATEGIES[name] if name in _STRATEGIES else _BY_TYPE[hint] for name, hint in _HINTS.items()},
)


@given(_configs)
def test_dump_reads_back_as_the_same_config(config: Config) -> None:
    # The table, not a file: a file per example would only slow hypothesis down.
    table = tomllib.loads(configfile.dump(config))
    assert Config(**configfile.from_table(table, Path("/nowhere"))) == config


def test_dump_refuses_what_toml_cannot_hold() -> None:
    undecodable = Path(os.fsdecode(b"/var/lib/\xff"))  # a name that is not UTF-8
    with pytest.raises(ConfigError, match=r"^root: "):
        configfile.dump(Config(root=undecodable))


@given(st.text())
def test_toml_strings_read_back(text: str) -> None:
    assert tomllib.loads(f"x = {configfile.toml_string(text)}")["x"] == text


# ---- real daemons ------------------------------------------------------------------------------


@dataclass
class FileDaemon(Daemon):
    """conftest's daemon, started with nothing but --config: the file names its socket,
    state dirs, bridge, subnet, table and cgroup (the same ones, so its cleanup applies)."""

    def config_file(self) -> Path:
        return self.base / "config.toml"

    def write_config(self, extra: str = "") -> Path:
        settings = {
            "socket": self.socket,
            "root": self.root,
            "run_root": self.run_root,
            "netns_dir": self.netns_dir,
            "bridge_name": self.bridge,
            "pod_subnet": self.pod_subnet,
            "nft_table": self.nft_table,
            "cni_conf_dir": self.base / "cni-none",
            "registry_config_dir": self.base / "certs.d",
            "cgroup_root": self.cgroup_root,
            "log_level": "debug",
        }
        lines = [f"{key} = {configfile.toml_string(str(value))}" for key, value in settings.items()]
        return write(self.config_file(), "\n".join([*lines, "ip_forward = false", extra]) + "\n")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "shim", "serve", "--config", str(self.config_file())]


@pytest.fixture
def file_daemon(tmp_path: Path) -> Iterator[FileDaemon]:
    base = tmp_path / "d"
    base.mkdir()
    d = FileDaemon(base=base)
    yield d
    d.cleanup()


@pytest.mark.root
def test_a_daemon_started_from_the_file_alone_serves_where_it_says(file_daemon: FileDaemon) -> None:
    d = file_daemon
    d.write_config()
    d.start()
    version = d.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert version.runtime_name == "pyshim" and d.socket.is_socket()
    assert "level=DEBUG" in d.log.read_text()  # the file's log_level was applied


@pytest.mark.root
def test_a_file_with_an_unknown_key_stops_serve_before_it_touches_anything(file_daemon: FileDaemon) -> None:
    d = file_daemon
    conf = d.write_config('nft_tabel = "typo"')
    before = sorted(p.name for p in d.base.iterdir())
    done = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60, cwd=d.base)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "event=cannot_start" in lines[0], done.stderr
    assert f'{conf}: unknown key "nft_tabel" (did you mean "nft_table"?)' in lines[0]
    assert sorted(p.name for p in d.base.iterdir()) == before  # no socket, root, run root, netns dir
    assert not Path(f"/sys/class/net/{d.bridge}").exists()
    assert not Path(f"/sys/fs/cgroup{d.cgroup_root}").exists()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert d.nft_table not in tables
