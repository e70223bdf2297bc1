"""Records on disk: SandboxRecord to and from JSON, and shim.store's RecordStore
(atomic writes, what load_all keeps and what it refuses, ids)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import examples
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shim import cri
from shim._proto import api_pb2
from shim.namespaces import NamespacePaths
from shim.network import PodNetwork, PortMapping
from shim.procs import ProcessIdentity
from shim.sandbox_record import (
    RECORD_VERSION,
    NamespaceMode,
    NamespaceModes,
    SandboxRecord,
    SandboxState,
    sandbox_store,
)
from shim.store import Metadata, is_id, new_id, write_atomically

text = st.text(max_size=12)
ids = st.text("0123456789abcdef", min_size=64, max_size=64)
modes = st.sampled_from(list(NamespaceMode))
ports = st.builds(
    PortMapping,
    protocol=st.sampled_from(["tcp", "udp", "sctp"]),
    container_port=st.integers(1, 65535),
    host_port=st.integers(0, 65535),
    host_ip=st.sampled_from(["", "127.0.0.1"]),
)
networks = st.builds(
    PodNetwork,
    ip=st.ip_addresses().map(str),
    additional_ips=st.lists(st.ip_addresses(v=6).map(str), max_size=2).map(tuple),
    host_interface=text,
    port_mappings=st.lists(ports, max_size=3).map(tuple),
    cni_result=st.one_of(st.just(""), st.dictionaries(text, text, max_size=2).map(json.dumps)),
    backend=st.sampled_from(["bridge", "cni"]),
)
records = st.builds(
    SandboxRecord,
    id=ids,
    metadata=st.builds(Metadata, name=text, uid=text, namespace=text, attempt=st.integers(0, 2**32 - 1)),
    state=st.sampled_from(list(SandboxState)),
    created_at=st.integers(0, 2**63 - 1),
    modes=st.builds(NamespaceModes, network=modes, pid=modes, ipc=modes, target_id=text),
    runtime_handler=text,
    hostname=text,
    log_directory=text,
    labels=st.dictionaries(text, text, max_size=3),
    annotations=st.dictionaries(text, text, max_size=3),
    pause=st.none()
    | st.builds(ProcessIdentity, pid=st.integers(1, 2**22), start_time=st.integers(0, 2**63), boot_id=text),
    namespaces=st.dictionaries(st.sampled_from(["net", "ipc", "uts", "pid"]), text).map(NamespacePaths.of),
    network=st.none() | networks,
    files=st.dictionaries(st.sampled_from(["resolv.conf", "hostname", "hosts"]), text),
    config=st.builds(
        api_pb2.PodSandboxConfig, hostname=text, labels=st.dictionaries(text, text, max_size=2)
    ).map(lambda c: c.SerializeToString()),
)


def fields(record: SandboxRecord) -> tuple[Any, ...]:
    # Records compare by identity (caches key on them): compare their fields.
    return tuple(getattr(record, name) for name in SandboxRecord.__slots__ if not name.startswith("__"))


@given(record=records)
@hsettings(max_examples=examples(30))
def test_every_field_survives_the_round_trip(record: SandboxRecord) -> None:
    data = json.loads(json.dumps(record.to_json()))
    assert data["version"] == RECORD_VERSION
    assert fields(SandboxRecord.from_json(data)) == fields(record)


def _record(**changes: Any) -> dict[str, Any]:
    record = SandboxRecord(
        id=new_id(),
        metadata=Metadata("web", "uid", "default", 0),
        state=SandboxState.READY,
        created_at=1,
        modes=NamespaceModes(),
        runtime_handler="runc",
        hostname="",
        log_directory="",
    )
    return {**record.to_json(), **changes}


@pytest.mark.parametrize("version", [0, 2, None, "1", 1.5])
def test_unknown_versions_are_refused(version: object) -> None:
    with pytest.raises(ValueError, match="record version"):
        SandboxRecord.from_json(_record(version=version))


@pytest.mark.parametrize("bad_id", ["", "abc", "A" * 64, "a" * 64 + "\n", "../" + "a" * 61])
def test_ids_must_be_ids(bad_id: str) -> None:
    with pytest.raises(ValueError, match="not 64 hex"):
        SandboxRecord.from_json(_record(id=bad_id))


def test_records_of_older_pyshims_still_load() -> None:
    """Records written before "files" and the network's "backend" existed."""
    data = _record(
        id=_DAMAGED_ID,
        network={"ip": "10.0.0.2", "additional_ips": [], "host_interface": "x", "port_mappings": []},
    )
    del data["files"]
    record = SandboxRecord.from_json(data)
    assert record.files == {} and record.network is not None and record.network.backend == "bridge"
    data["network"]["cni_result"] = "{}"
    assert SandboxRecord.from_json(data).network.backend == "cni"  # type: ignore[union-attr]


def test_ids() -> None:
    made = {new_id() for _ in range(100)}
    assert len(made) == 100 and all(is_id(i) for i in made)
    for bad in ["", "a" * 63, "a" * 65, "A" * 64, "a" * 64 + "\n", "g" * 64, " " + "a" * 63]:
        assert not is_id(bad)


def test_write_atomically(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_atomically(path, b"one")
    write_atomically(path, b"two" * 100000, durable=False)
    assert path.read_bytes() == b"two" * 100000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temp file left
    assert (path.stat().st_mode & 0o777) == 0o600


def test_store_save_load_delete(tmp_path: Path) -> None:
    store = sandbox_store(tmp_path / "sandboxes")
    records = [SandboxRecord.from_json(_record()) for _ in range(3)]
    for record in records:
        store.save(record)
    assert store.ids() == {r.id for r in records}
    assert sorted(fields(r) for r in store.load_all()) == sorted(fields(r) for r in records)
    store.delete(records[0].id)
    store.delete(records[0].id)  # idempotent
    assert store.ids() == {r.id for r in records[1:]}
    assert {p.name for p in store.directory.iterdir()} == {f"{r.id}.json" for r in records[1:]}


@pytest.mark.parametrize("bad_id", ["../x", "a" * 64 + "\n", "", "A" * 64, "a" * 63 + "/"])
def test_store_paths_are_ids_only(tmp_path: Path, bad_id: str) -> None:
    store = sandbox_store(tmp_path)
    with pytest.raises(ValueError, match="not an id"):
        store.path(bad_id)
    with pytest.raises(ValueError):
        store.delete(bad_id)


def test_load_all_skips_bad_files_and_removes_temp_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = sandbox_store(tmp_path)
    good = SandboxRecord.from_json(_record())
    store.save(good)
    bad: dict[str, bytes] = {
        "not json": b"{",
        "a list": b"[]",
        "future version": json.dumps(_record(version=99)).encode(),
        "missing field": json.dumps({k: v for k, v in _record().items() if k != "modes"}).encode(),
        "wrong type": json.dumps(_record(labels=5)).encode(),
        "bad state": json.dumps(_record(state="running")).encode(),
        "bad mode": json.dumps(
            _record(modes={"network": "HOST", "pid": "POD", "ipc": "POD", "target_id": ""})
        ).encode(),
        "not utf-8": b"\xff\xfe",
        "bad base64": json.dumps(_record(config="***")).encode(),
    }
    for content in bad.values():
        (tmp_path / f"{new_id()}.json").write_bytes(content)
    # A record under another record's name: never loaded as that one.
    (tmp_path / f"{new_id()}.json").write_text(json.dumps(_record()))
    (tmp_path / f".{new_id()}.json.tmp").write_text("half written")
    with caplog.at_level(logging.ERROR, logger="shim.store"):
        loaded = store.load_all()
    assert [r.id for r in loaded] == [good.id]
    assert sum("record_refused" in m for m in caplog.messages) == len(bad) + 1
    assert not list(tmp_path.glob(".*.tmp"))
    # Refused files are left alone (a newer pyshim may read them), and still count as ids.
    assert len(store.ids()) == len(bad) + 2
    assert len(os.listdir(tmp_path)) == len(bad) + 2


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([float("inf"), float("nan"), 2**64, 2**31, -1, 0, "", [], {}]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


_DAMAGED_ID = "d" * 64


@st.composite
def damaged_records(draw: st.DrawFn) -> bytes:
    """A record file as a crash, a bad disk or a hand edit may leave it: a valid record
    with one value replaced by any JSON (Infinity and NaN included), or cut short."""
    data = _record(
        id=_DAMAGED_ID,
        network={
            "ip": "10.0.0.2",
            "additional_ips": ["fd00::2"],
            "host_interface": "x",
            "port_mappings": [{"protocol": "tcp", "container_port": 80, "host_port": 8080, "host_ip": ""}],
        },
        pause={"pid": 1, "start_time": 2, "boot_id": "b"},
        namespaces={"net": "/run/netns/x"},
        labels={"a": "b"},
        files={"hosts": "/run/x/hosts"},
    )
    node: Any = data
    while True:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if isinstance(node[key], (dict, list)) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        node[key] = draw(_json_values)
        break
    encoded = json.dumps(data).encode()
    return encoded[: draw(st.integers(0, len(encoded)))] if draw(st.integers(0, 9)) == 0 else encoded


@given(content=damaged_records() | st.binary(max_size=64))
@hsettings(max_examples=examples(40))
def test_a_damaged_record_is_refused_or_usable(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    """The daemon loads every record at start and serves them to every list: a bad file
    must neither stop it nor be loaded half valid (ListPodSandbox would fail on it for
    ever). A record that loads encodes as CRI messages and round-trips."""
    store = sandbox_store(tmp_path_factory.mktemp("records"))
    (store.directory / f"{_DAMAGED_ID}.json").write_bytes(content)
    for record in store.load_all():
        cri.pod_sandbox(record).SerializeToString()
        cri.pod_sandbox_status(record).SerializeToString()
        cri.verbose_info(record)
        assert fields(SandboxRecord.from_json(json.loads(json.dumps(record.to_json())))) == fields(record)
