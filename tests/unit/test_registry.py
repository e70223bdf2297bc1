"""shim.registry: names reserved while an object is made (commit, release, waiting
duplicates), lookups by id and unique prefix, discard, adopt, generation."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
from conftest import examples
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shim.errors import AlreadyExists, InvalidArgument, NotFound
from shim.registry import Registry
from shim.store import new_id


@dataclass(eq=False)
class Entry:
    id: str
    reservation: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    removed: bool = False


def test_reserve_commit_release() -> None:
    reg: Registry[Entry] = Registry("thing")
    assert reg.reserve("a", 1) is None
    entry = Entry(new_id(), "a")
    generation = reg.generation
    reg.commit("a", entry)
    assert reg.generation > generation
    assert reg.reserve("a", 1) is entry  # the holder, for the caller to judge
    assert reg.get(entry.id) is entry and len(reg) == 1
    assert reg.reserve("b", 1) is None
    reg.release("b")  # made nothing: the name is free again
    assert reg.reserve("b", 1) is None
    reg.release("b")
    reg.release("never reserved")  # harmless


def test_a_duplicate_waits_for_the_first() -> None:
    reg: Registry[Entry] = Registry("thing")
    assert reg.reserve("a", 1) is None
    entry = Entry(new_id(), "a")
    got: list[Entry | None] = []
    waiter = threading.Thread(target=lambda: got.append(reg.reserve("a", 10)))
    waiter.start()
    time.sleep(0.02)
    assert got == [] and waiter.is_alive()
    reg.commit("a", entry)
    waiter.join(5)
    assert got == [entry]


def test_a_duplicate_of_a_failed_create_reserves_the_name_itself() -> None:
    reg: Registry[Entry] = Registry("thing")
    assert reg.reserve("a", 1) is None
    got: list[Entry | None] = []
    waiter = threading.Thread(target=lambda: got.append(reg.reserve("a", 10)))
    waiter.start()
    time.sleep(0.02)
    reg.release("a")
    waiter.join(5)
    assert got == [None]  # its turn to make it
    with pytest.raises(AlreadyExists, match="still being created"):
        reg.reserve("a", 0.02)


def test_waiting_is_bounded() -> None:
    reg: Registry[Entry] = Registry("pod sandbox")
    reg.reserve("a", 1)
    start = time.monotonic()
    with pytest.raises(AlreadyExists) as err:
        reg.reserve("a", 0.03)
    assert 0.03 <= time.monotonic() - start < 2
    assert "pod sandbox name 'a' is still being created by another request" in str(err.value)


def test_lookups_by_id_and_prefix() -> None:
    reg: Registry[Entry] = Registry("pod sandbox")
    ids = ["abc" + "0" * 61, "abd" + "0" * 61, "ff" + "0" * 62]
    for i, entry_id in enumerate(ids):
        reg.adopt(Entry(entry_id, f"n{i}"))
    assert reg.find(ids[0]) is reg.get("abc") is reg.get(ids[0][:40])
    assert reg.get("f").id == ids[2]
    for ambiguous in ("a", "ab"):
        with pytest.raises(InvalidArgument) as err:
            reg.find(ambiguous)
        assert f"pod sandbox id prefix {ambiguous!r} is ambiguous (2 match)" in str(err.value)
    for missing in ("abe", "0", ids[0] + "0", ids[0] + "\n", "ABC", "../abc"):
        assert reg.find(missing) is None
        with pytest.raises(NotFound, match="not found"):
            reg.get(missing)
    assert reg.find("") is None  # callers refuse an empty id before
    assert {e.id for e in reg.entries()} == set(ids)
    assert {e.id for e in reg.entries("ab")} == set(ids[:2]) and reg.entries("zz") == []
    assert [e.id for e in reg.entries(ids[1])] == [ids[1]]


def test_discard_frees_only_its_own_name() -> None:
    reg: Registry[Entry] = Registry("thing")
    first, second = Entry(new_id(), "a"), Entry(new_id(), "a")
    reg.adopt(first)
    reg.adopt(second)  # after a restart two records may claim one name: the first keeps it
    assert reg.reserve("a", 1) is first
    reg.discard(second)
    assert reg.reserve("a", 1) is first and reg.find(second.id) is None
    generation = reg.generation
    reg.discard(first)
    assert reg.generation > generation
    assert reg.reserve("a", 1) is None and len(reg) == 0
    reg.discard(first)  # twice is harmless
    reg.changed()
    assert reg.generation > generation + 1


@given(
    ids=st.lists(st.text("0123456789abcdef", min_size=64, max_size=64), unique=True, max_size=12),
    data=st.data(),
)
@hsettings(max_examples=examples(25))
def test_find_is_exact_or_a_unique_prefix(ids: list[str], data: st.DataObject) -> None:
    reg: Registry[Entry] = Registry("thing")
    for n, entry_id in enumerate(ids):
        reg.adopt(Entry(entry_id, f"name{n}"))
    query = data.draw(
        st.one_of(
            st.text("0123456789abcdef", min_size=1, max_size=65),
            st.sampled_from(ids or ["0"]).flatmap(lambda i: st.integers(1, 64).map(lambda n: i[:n])),
        )
    )
    matches = [i for i in ids if i.startswith(query)]
    if len(matches) > 1 and query not in ids:
        with pytest.raises(InvalidArgument):
            reg.find(query)
    else:
        found = reg.find(query)
        assert (found.id if found else None) == (matches[0] if matches else None)
    assert sorted(e.id for e in reg.entries(query)) == ([query] if query in ids else sorted(matches))
