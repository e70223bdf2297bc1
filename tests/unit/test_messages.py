"""shim.rpc.bounded: error messages fit in a gRPC status header whatever they quote."""

from __future__ import annotations

from conftest import examples
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shim.rpc import MAX_MESSAGE_BYTES, bounded


@given(
    text=st.text(max_size=50) | st.builds(lambda c, n: c * n, st.sampled_from("aé🙂\n"), st.integers(0, 5000))
)
@hsettings(max_examples=examples(30))
def test_a_message_is_cut_at_a_character_to_its_budget(text: str) -> None:
    message = bounded(text)
    if len(text.encode()) <= MAX_MESSAGE_BYTES:
        assert message == text
    else:
        assert message.endswith(" [...]") and text.startswith(message.removesuffix(" [...]"))
        assert len(message.encode()) <= MAX_MESSAGE_BYTES + len(" [...]")
