"""shim.network.cni, the configuration part: which file is used, what makes one
unusable, and what each plugin is handed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shim.errors import FailedPrecondition
from shim.network import PortMapping
from shim.network.cni import CniNetwork, NetworkList, config_files, find_plugin, load


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, tuple[Path, ...]]:
    """A config dir and two plugin dirs: bridge and host-local in one, portmap in the other."""
    conf, bin1, bin2 = tmp_path / "net.d", tmp_path / "bin1", tmp_path / "bin2"
    for d in (conf, bin1, bin2):
        d.mkdir()
    for directory, name in ((bin1, "bridge"), (bin1, "host-local"), (bin2, "portmap")):
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)
    (bin1 / "not-executable").write_text("")
    return conf, (bin1, bin2)


def write(conf: Path, name: str, content: object) -> Path:
    path = conf / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "podnet",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def test_a_conflist(dirs: tuple[Path, tuple[Path, ...]]) -> None:
    conf, bins = dirs
    path = write(conf, "10-pods.conflist", CONFLIST)
    network = load(conf, bins)
    assert network == NetworkList("podnet", "1.0.0", tuple(CONFLIST["plugins"]), path)  # type: ignore[arg-type]


def test_a_single_plugin_conf_and_json(dirs: tuple[Path, tuple[Path, ...]]) -> None:
    conf, bins = dirs
    single = {"name": "one", "type": "bridge", "ipam": {"type": "host-local"}}
    for name in ("10-one.conf", "10-one.json"):
        path = write(conf, name, single)
        network = load(conf, bins)
        assert (network.name, network.plugins, network.source) == ("one", (single,), path)
        assert network.cni_version == "0.4.0"  # the default when none is given
        path.unlink()
    # A .conf that holds a plugin list is read as one.
    write(conf, "10-list.conf", CONFLIST)
    assert len(load(conf, bins).plugins) == 2


def test_the_first_valid_file_by_name_wins(dirs: tuple[Path, tuple[Path, ...]]) -> None:
    conf, bins = dirs
    write(conf, "00-broken.conflist", "{not json")
    write(conf, "05-ignored.yaml", CONFLIST)  # not a CNI config suffix
    (conf / "07-dir.conf").mkdir()  # a directory, whatever its name
    good = write(conf, "10-good.conflist", CONFLIST)
    write(conf, "20-later.conflist", {**CONFLIST, "name": "later"})
    assert config_files(conf) == [conf / "00-broken.conflist", good, conf / "20-later.conflist"]
    assert load(conf, bins).source == good


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "00-x.conflist: "),
        ("[1, 2]", "not a JSON object"),
        ({"name": "n", "plugins": []}, "no plugins"),
        ({"name": "n", "plugins": {"type": "bridge"}}, "no plugins"),
        ({"name": "n"}, "no plugins"),  # a .conflist needs its list
        ({"name": "n", "plugins": [{"bridge": "cni0"}]}, "a plugin without a type"),
        ({"name": "n", "plugins": [{"type": 5}]}, "a plugin without a type"),
        ({"name": "n", "plugins": ["bridge"]}, "a plugin without a type"),
        ({"name": "n", "plugins": [{"type": "flannel"}]}, "plugin 'flannel' not found in"),
        ({"name": "n", "plugins": [{"type": "../bin1/bridge"}]}, "plugin '../bin1/bridge' not found"),
        ({"name": "n", "plugins": [{"type": "/bin/sh"}]}, "plugin '/bin/sh' not found"),
        ({"name": "n", "plugins": [{"type": "not-executable"}]}, "plugin 'not-executable' not found"),
        ({"plugins": [{"type": "bridge"}]}, "'name'"),  # KeyError
    ],
)
def test_unusable_configurations(dirs: tuple[Path, tuple[Path, ...]], content: object, said: str) -> None:
    conf, bins = dirs
    write(conf, "00-x.conflist", content)
    with pytest.raises(FailedPrecondition) as err:
        load(conf, bins)
    assert str(err.value).startswith("no usable CNI configuration: 00-x.conflist: ") and said in str(
        err.value
    )
    # Status says so, and names the reason; a host-network pod does not need it.
    network = CniNetwork(conf, bins)
    ready, reason, message = network.status()
    assert (ready, reason) == (False, "NetworkPluginNotReady") and said in message
    assert network.describe()["problem"] == message and network.describe()["network"] is None


def test_every_problem_is_named(dirs: tuple[Path, tuple[Path, ...]]) -> None:
    conf, bins = dirs
    write(conf, "a.conf", "[]")
    write(conf, "b.json", {"name": "n", "type": "flannel"})
    with pytest.raises(FailedPrecondition) as err:
        load(conf, bins)
    assert "a.conf: not a JSON object" in str(err.value) and "b.json: plugin 'flannel'" in str(err.value)


def test_no_configuration(tmp_path: Path) -> None:
    for conf in (tmp_path / "missing", tmp_path):
        with pytest.raises(FailedPrecondition) as err:
            load(conf, ())
        assert str(err.value) == f"no CNI network configuration in {conf}"
    assert config_files(tmp_path / "missing") == []


def test_plugins_are_looked_for_in_order(dirs: tuple[Path, tuple[Path, ...]], tmp_path: Path) -> None:
    _, bins = dirs
    assert find_plugin("portmap", bins) == bins[1] / "portmap"
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "portmap").write_text("")
    (shadow / "portmap").chmod(0o755)
    assert find_plugin("portmap", (shadow, *bins)) == shadow / "portmap"
    for bad in ["", ".", "..", "a/b", "-x", "bridge\n", "bridge ", "é"]:
        assert find_plugin(bad, bins) is None


def test_what_each_plugin_is_handed(dirs: tuple[Path, tuple[Path, ...]]) -> None:
    conf, bins = dirs
    write(conf, "10-pods.conflist", CONFLIST)
    network = CniNetwork(conf, bins)
    assert network.status() == (True, "", "")
    assert network.network is not None
    bridge, portmap = network.network.plugins
    ports = (PortMapping("tcp", 80, 8080), PortMapping("udp", 53, 5353, "127.0.0.1"))
    first = CniNetwork._plugin_conf(network.network, bridge, None, ports)
    assert first == {**bridge, "name": "podnet", "cniVersion": "1.0.0"}  # no portMappings capability
    previous = {"ips": [{"address": "10.22.0.5/16"}]}
    second = CniNetwork._plugin_conf(network.network, portmap, previous, ports)
    assert second["prevResult"] == previous
    assert second["runtimeConfig"] == {
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
        ]
    }
    assert "runtimeConfig" not in CniNetwork._plugin_conf(network.network, portmap, previous, ())
    assert portmap == CONFLIST["plugins"][1]  # type: ignore[index]  # the loaded config is not changed
