"""events/normalise.py: vLLM's events → core events; the extra-keys verdict, salts, LoRA, media.

The index hashes only the tokens, the LoRA name and a cache salt: a store whose prefix depends on
anything else is left out of the core batch and counted in `unsupported_events`.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvroute.core import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvroute.events import (
    BatchDecoder,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    decode_batch,
    decode_vllm,
    encode_batch,
    normalise_batch,
)

TOKENS = list(range(1000, 1064))  # 4 blocks of 16
HASHES = [11, 12, 13, 14]


# Four blocks of TOKENS, no parent, on GPU: the fields vLLM's and the core's BlockStored share.
SHARED: dict[str, Any] = {
    "block_hashes": HASHES,
    "parent_block_hash": None,
    "token_ids": TOKENS,
    "block_size": 16,
    "medium": "GPU",
}


def vllm_stored(**kw: Any) -> VllmBlockStored:
    """SHARED as vLLM sends it; `kw` sets vLLM's other fields."""
    return VllmBlockStored(**{**SHARED, **kw})


def core_stored(**kw: Any) -> BlockStored:
    """`vllm_stored()` as the index sees it; `kw` sets core fields (lora_name, cache_salt)."""
    return BlockStored(**{**SHARED, **kw})


def normalise_one(event: VllmBlockStored) -> EventBatch:
    return normalise_batch(VllmEventBatch(1.0, [event], 0))


# --- plain text ------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [None, [], [None] * 4], ids=["nil", "empty", "nones"])
def test_plain_text_extra_keys_of_nones_are_kept(keys: list[Any] | None) -> None:
    # vLLM >= 0.31 sends one None per block for a plain-text request.
    batch = normalise_one(vllm_stored(extra_keys=keys))
    assert batch == EventBatch(1.0, [core_stored()], 0, 0, 0)


def test_vllm_only_fields_do_not_reach_the_core_event() -> None:
    event = vllm_stored(
        group_idx=0,
        kv_cache_spec_kind="full_attention",
        kv_cache_spec_sliding_window=None,
        locality="LOCAL",
        ownership="owned",
        session_id="s",
    )
    assert normalise_one(event).events == [core_stored(group_idx=0)]


# --- extra keys we can reproduce -------------------------------------------------------------


def test_extra_keys_none_and_lora_name_are_reproducible() -> None:
    event = vllm_stored(lora_name="sql", extra_keys=[["sql"], None, ["sql"], ("sql",)])
    batch = normalise_one(event)
    assert batch.events == [core_stored(lora_name="sql")]
    assert batch.unsupported_events == 0


@pytest.mark.parametrize(
    "keys",
    [[["s1"], None], ["s1", None], [[["cache_salt", "s1"]], None]],
    ids=["listed", "raw", "tagged"],
)
def test_extra_keys_cache_salt_on_block_zero_lands_in_cache_salt(keys: list[Any]) -> None:
    batch = normalise_one(vllm_stored(extra_keys=keys))
    assert batch.events == [core_stored(cache_salt="s1")]
    assert batch.unsupported_events == 0


def test_extra_keys_tagged_forms_are_accepted() -> None:
    keys = [[["lora", "sql", "/path"], ["cache_salt", "s"]], [["lora", "sql", "/path"]]]
    event = vllm_stored(
        block_hashes=HASHES[:2], token_ids=TOKENS[:32], lora_name="sql", extra_keys=keys
    )
    (got,) = normalise_one(event).events
    assert got == core_stored(
        block_hashes=HASHES[:2], token_ids=TOKENS[:32], lora_name="sql", cache_salt="s"
    )


def test_extra_keys_lora_named_by_id_is_reproducible() -> None:
    event = vllm_stored(lora_name="sql", lora_id=7, extra_keys=[[7], None, None, None])
    assert normalise_one(event).events == [core_stored(lora_name="sql")]


def test_lora_id_with_its_name_is_kept_and_named() -> None:
    assert normalise_one(vllm_stored(lora_name="sql", lora_id=1)).events == [
        core_stored(lora_name="sql")
    ]


# --- extra keys we cannot reproduce ----------------------------------------------------------


UNSUPPORTED: list[dict[str, Any]] = [
    {"extra_keys": [[["mm-abc", 0]], None, None, None]},  # multimodal (id, offset)
    {"extra_keys": [None, [b"\x01" * 32], None, None]},  # prompt embeds digest
    {"extra_keys": [None, ["late-salt"], None, None]},  # a salt not on block 0
    {"extra_keys": [[1.5], None, None, None]},
    {"lookahead_token_ids": [[1, 2]]},
    {"lora_id": 3},  # an adapter without a name (releases before lora_name)
]
UNSUPPORTED_IDS = ["mm", "prompt-embeds", "salt-not-first", "float", "lookahead", "unnamed-lora"]


@pytest.mark.parametrize("extra", UNSUPPORTED, ids=UNSUPPORTED_IDS)
def test_extra_keys_we_cannot_reproduce_are_dropped(extra: dict[str, Any]) -> None:
    batch = normalise_batch(
        VllmEventBatch(1.0, [vllm_stored(**extra), VllmBlockRemoved([1], "GPU")], 0)
    )
    # Left out of the batch, counted; the events around it are kept in order.
    assert batch == EventBatch(1.0, [BlockRemoved([1], "GPU")], 0, 0, 1)


@pytest.mark.parametrize("extra", UNSUPPORTED, ids=UNSUPPORTED_IDS)
def test_extra_keys_we_cannot_reproduce_are_dropped_by_the_wire_decoders(
    extra: dict[str, Any],
) -> None:
    payload = encode_batch(VllmEventBatch(1.0, [vllm_stored(**extra)], 0), "0.33.0")
    for decoded in (decode_batch(payload), BatchDecoder().decode(payload)):
        assert (decoded.events, decoded.unsupported_events) == ([], 1)


@pytest.mark.parametrize("release", ["0.17.0", "0.22.0", "0.24.0", "0.33.0"])
def test_extra_keys_verdict_of_the_wire_decoders_is_normalise_batch(release: str) -> None:
    # Every release that sends extra keys: the typed fast paths agree with the normaliser.
    events: list[Any] = [
        vllm_stored(extra_keys=[None] * 4),
        vllm_stored(lora_name="sql", lora_id=1, extra_keys=[["sql"], None, ["sql"], None]),
        vllm_stored(extra_keys=[["s1"], None, None, None]),
        vllm_stored(lora_name="sql", lora_id=7, extra_keys=[[7], None, None, None]),
        *(vllm_stored(**extra) for extra in UNSUPPORTED),
        VllmBlockRemoved([1], "cpu"),
        VllmAllBlocksCleared(),
    ]
    payload = encode_batch(VllmEventBatch(1.0, events, 0), release)
    want = normalise_batch(decode_vllm(payload))
    # Releases before 0.33 cannot send lookahead tokens: that store arrives plain.
    assert want.unsupported_events == (6 if release == "0.33.0" else 5)
    assert decode_batch(payload) == want
    decoder = BatchDecoder()
    assert decoder.decode(payload) == want
    assert decoder.decode(payload) == want  # the learned fast path


# --- the rest of the batch --------------------------------------------------------------------


def test_batch_fields_order_and_media_are_normalised() -> None:
    batch = VllmEventBatch(
        2.5,
        [
            VllmBlockRemoved([1], "cpu", 0, locality="LOCAL"),
            vllm_stored(medium="Cpu"),
            VllmAllBlocksCleared(),
            vllm_stored(medium=None),
        ],
        3,
        skipped_events=2,
    )
    assert normalise_batch(batch) == EventBatch(
        2.5,
        [
            BlockRemoved([1], "CPU", 0),
            core_stored(medium="CPU"),
            AllBlocksCleared(),
            core_stored(medium=None),
        ],
        3,
        skipped_events=2,
        unsupported_events=0,
    )


@pytest.mark.parametrize(
    "wrong", [BlockStored([1], None, [1], 1), object()], ids=["core", "object"]
)
def test_an_event_of_another_type_is_a_type_error_not_a_silent_guess(wrong: object) -> None:
    with pytest.raises(TypeError, match="expected VllmBlockStored"):
        normalise_batch(VllmEventBatch(1.0, [wrong]))  # type: ignore[list-item]
