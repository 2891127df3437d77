"""Modality ids from token ids and from processor token types."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from masq_fx.modality import (
    Modality,
    ModalityPolicy,
    ModalityTokens,
    decode_modality_ids,
    modality_ids,
    modality_ids_from_token_types,
    present_modalities,
)

TOKENS = ModalityTokens(image=7, video=8, audio=9)


def test_placeholders_map_to_their_modality_and_markers_to_text():
    ids = torch.tensor([[1, 7, 7, 2, 9, 9, 8, 3]])
    got = modality_ids(ids, TOKENS)
    assert got.tolist() == [[0, 1, 1, 0, 2, 2, 1, 0]]
    assert got.dtype == torch.long


def test_video_policy_and_padding():
    ids = torch.tensor([[8, 8, 7, 9]])
    mask = torch.tensor([[0, 1, 1, 1]])
    as_text = modality_ids(ids, TOKENS, ModalityPolicy(video_as="text"), attention_mask=mask)
    assert as_text.tolist() == [[0, 0, 1, 2]]
    assert modality_ids(ids, TOKENS, attention_mask=mask).tolist() == [[0, 1, 1, 2]]


def test_token_types_follow_transformers_convention():
    types = torch.tensor([[0, 1, 2, 3]])
    assert modality_ids_from_token_types(types).tolist() == [[0, 1, 1, 2]]
    assert modality_ids_from_token_types(types, ModalityPolicy(video_as=Modality.TEXT)).tolist() == [[0, 1, 0, 2]]
    with pytest.raises(ValueError, match="0..3"):
        modality_ids_from_token_types(torch.tensor([[4]]))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        modality_ids(torch.tensor([1, 2]), TOKENS)
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        Modality.parse("smell")


def test_decode_steps_are_text():
    assert decode_modality_ids(3, 2).eq(int(Modality.TEXT)).all()


@given(st.lists(st.lists(st.integers(0, 12), min_size=5, max_size=5), min_size=1, max_size=4))
def test_modality_ids_agree_with_token_types(rows):
    ids = torch.tensor(rows)
    types = torch.zeros_like(ids)
    types[ids == TOKENS.image] = 1
    types[ids == TOKENS.video] = 2
    types[ids == TOKENS.audio] = 3
    assert torch.equal(modality_ids(ids, TOKENS), modality_ids_from_token_types(types))
    expected = {Modality.TEXT if v not in (7, 8, 9) else Modality.parse({7: 1, 8: 1, 9: 2}[v]) for v in ids.flatten().tolist()}
    assert set(present_modalities(modality_ids(ids, TOKENS))) == expected
