"""Images.find / matching over a store on disk: ids, prefixes, references. An
ambiguous id prefix is INVALID_ARGUMENT asking for more of the id, as for
sandboxes; a list filter never fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import InvalidArgument, NotFound
from shim.images import Images
from shim.images.store import ImageRecord, ImageStore

A = "sha256:" + "abcdef012345" + "1" * 52
B = "sha256:" + "abcdef012345" + "2" * 52
MANIFEST = "sha256:" + "f" * 64


@pytest.fixture
def images(tmp_path: Path) -> Images:
    store = ImageStore(tmp_path / "images", owner=False)
    for digest in (A, B, MANIFEST):  # records need their blobs present; content is not read here
        store.blob_path(digest).write_bytes(b"")
    store.commit(ImageRecord(id=A, manifest_digest=MANIFEST, layers=(), size=0, repo_tags=("r.example/a:1",)))
    store.commit(ImageRecord(id=B, manifest_digest=MANIFEST, layers=(), size=0, repo_tags=("r.example/b:1",)))
    return Images(store)


def test_an_ambiguous_prefix_asks_for_more_of_the_id(images: Images) -> None:
    for prefix in ("abcdef012345", "sha256:abcdef012345"):
        with pytest.raises(InvalidArgument) as err:
            images.find(prefix)
        assert "ambiguous" in str(err.value) and "give more of the id" in str(err.value)
    assert [r.id for r in images.matching("abcdef012345")] == [A, B]  # a list shows them all


def test_unique_prefixes_ids_and_references(images: Images) -> None:
    assert images.get("abcdef0123451").id == A
    assert images.get(B).id == B
    assert images.get(B.removeprefix("sha256:")).id == B
    assert images.get("r.example/b:1").id == B
    assert images.find("r.example/c:1") is None
    assert images.find("abcdef012346") is None  # no such id: read as a name, which names nothing
    with pytest.raises(NotFound):
        images.get("r.example/c:1")
    assert [r.id for r in images.matching("r.example/a:1")] == [A]


@pytest.mark.parametrize("text", ["Bad Ref!", "a\n", "abc\x00", "é", "r.example/a:1\n", ":"])
def test_malformed_names_are_invalid_argument_but_list_nothing(images: Images, text: str) -> None:
    with pytest.raises(InvalidArgument):
        images.find(text)
    assert images.matching(text) == []


def test_empty_is_required_for_lookup_and_everything_for_a_list(images: Images) -> None:
    with pytest.raises(InvalidArgument):
        images.find("")
    assert len(images.matching("")) == 2
