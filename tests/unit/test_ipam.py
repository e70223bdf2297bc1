"""shim.network.ipam: round-robin allocation, never an address twice, release,
reconciliation, exhaustion; one file per address, on a tmp dir."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from conftest import examples
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shim.errors import ResourceExhausted
from shim.network.ipam import Ipam
from shim.store import new_id

SUBNET = ipaddress.ip_network("10.1.2.0/29")  # hosts .1-.6; .1 is the gateway: 5 for pods
GATEWAY = ipaddress.ip_address("10.1.2.1")


def ipam(directory: Path, subnet: str = "10.1.2.0/29") -> Ipam:
    network = ipaddress.ip_network(subnet)
    return Ipam(directory, network, next(network.hosts()))


def on_disk(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir()}


def test_round_robin_and_never_twice(tmp_path: Path) -> None:
    pool = ipam(tmp_path)
    owners = [new_id() for _ in range(6)]
    got = [str(pool.allocate(o)) for o in owners[:5]]
    assert got == ["10.1.2.2", "10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"]  # never the gateway
    assert pool.allocate(owners[0]) == ipaddress.ip_address("10.1.2.2")  # an owner keeps its address
    assert on_disk(tmp_path) == dict(zip(got, owners[:5], strict=True))
    assert pool.free() == 0
    with pytest.raises(ResourceExhausted) as err:
        pool.allocate(owners[5])
    assert "10.1.2.0/29" in str(err.value) and "--pod-subnet" in str(err.value)
    pool.release(owners[1])
    assert pool.free() == 1 and "10.1.2.3" not in on_disk(tmp_path)
    assert str(pool.allocate(owners[5])) == "10.1.2.3"


def test_a_released_address_is_the_last_to_come_back(tmp_path: Path) -> None:
    pool = ipam(tmp_path, "10.1.2.0/28")  # .2-.14 for pods
    first, second = new_id(), new_id()
    assert str(pool.allocate(first)) == "10.1.2.2"
    pool.release(first)
    assert str(pool.allocate(second)) == "10.1.2.3"  # the cursor moves on
    assert [str(pool.allocate(new_id())) for _ in range(11)] == [f"10.1.2.{i}" for i in range(4, 15)]
    assert str(pool.allocate(new_id())) == "10.1.2.2"  # only after every other one
    assert pool.free() == 0


def test_release_is_idempotent(tmp_path: Path) -> None:
    pool = ipam(tmp_path)
    owner = new_id()
    pool.release(owner)
    pool.allocate(owner)
    pool.release(owner)
    pool.release(owner)
    assert on_disk(tmp_path) == {} and pool.allocated() == {} and pool.free() == 5


def test_allocations_survive_a_restart_and_junk_is_dropped(tmp_path: Path) -> None:
    pool = ipam(tmp_path)
    owner = new_id()
    address = str(pool.allocate(owner))
    (tmp_path / "10.1.2.6").write_text("not-an-id")  # a file no live pod can own
    (tmp_path / "10.9.9.9").write_text(new_id())  # outside the subnet (the range changed)
    (tmp_path / "junk").write_text(new_id())  # not an address: left alone
    (tmp_path / f"{address}.tmp").write_text(new_id())
    again = ipam(tmp_path)
    assert again.allocated() == {owner: address}
    assert sorted(on_disk(tmp_path)) == sorted([address, "junk", f"{address}.tmp"])
    other = again.allocate(new_id())
    assert str(other) != address and again.free() == 3


def test_reconcile_claims_recorded_addresses_and_frees_the_rest(tmp_path: Path) -> None:
    pool = ipam(tmp_path)
    live, crashed, lost = new_id(), new_id(), new_id()
    live_address = str(pool.allocate(live))
    pool.allocate(crashed)  # allocated, then the daemon died before the record was written
    # A live pod whose address file is gone (written by hand, say): its record says .5.
    pool.reconcile({live: live_address, lost: "10.1.2.5"})
    assert pool.allocated() == {live: live_address, lost: "10.1.2.5"}
    assert on_disk(tmp_path) == {live_address: live, "10.1.2.5": lost}
    # An address held by another owner is not taken over; one outside the subnet is ignored.
    thief, outsider = new_id(), new_id()
    pool.reconcile({live: live_address, lost: "10.1.2.5", thief: live_address, outsider: "10.9.9.9"})
    assert pool.allocated() == {live: live_address, lost: "10.1.2.5"}


def test_ipv6_range(tmp_path: Path) -> None:
    pool = ipam(tmp_path, "fd00::/125")  # ::1 gateway, ::2-::7 for pods (no broadcast in v6)
    got = [str(pool.allocate(new_id())) for _ in range(6)]
    assert got == [f"fd00::{i}" for i in range(2, 8)] and pool.free() == 0
    with pytest.raises(ResourceExhausted):
        pool.allocate(new_id())


def test_a_large_range_is_not_listed(tmp_path: Path) -> None:
    pool = ipam(tmp_path, "10.0.0.0/8")
    assert pool.free() == 2**24 - 2 - 1
    assert str(pool.allocate(new_id())) == "10.0.0.2"


_OPS = st.lists(
    st.tuples(st.sampled_from(["allocate", "release", "restart"]), st.integers(0, 7)), max_size=40
)


@given(ops=_OPS)
@hsettings(max_examples=examples(20))
def test_never_two_owners_for_one_address(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    """Any sequence of allocations, releases and restarts: the files, allocated() and
    free() agree, no address has two owners, and allocation fails only when full."""
    directory = tmp_path_factory.mktemp("ipam")
    owners = [new_id() for _ in range(8)]
    pool = ipam(directory)
    model: dict[str, str] = {}
    for op, n in ops:
        owner = owners[n]
        if op == "allocate":
            if owner in model or len(model) < 5:
                model[owner] = str(pool.allocate(owner))
            else:
                with pytest.raises(ResourceExhausted):
                    pool.allocate(owner)
        elif op == "release":
            pool.release(owner)
            model.pop(owner, None)
        else:
            pool = ipam(directory)
        assert pool.allocated() == model
        assert len(set(model.values())) == len(model) and str(GATEWAY) not in model.values()
        assert {a: o for o, a in model.items()} == on_disk(directory)
        assert pool.free() == 5 - len(model)
