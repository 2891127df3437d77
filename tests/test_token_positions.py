"""Indexed CMC branches: per-modality token positions as graph inputs (``masq_fx.capture.positions``).

The indexed layout computes a branch on its modality's tokens only (gather, low-rank product,
``index_add``); the masked layout computes every branch for every token and keeps each token's own.
They are the same algebra, so they agree to float rounding: a gathered GEMM rounds as the full one
within ``1e-5 · max|y|`` on a module, and the logits of a lowered graph within ``1e-3 · max|logit|``
(far below the backend's own tolerance against the reference, ``2e-2``).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from helpers import CalibratedTiny, calibrated_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from masq_fx.backends import Int8QuantLinear, compile_graph, lower_to_torchao
from masq_fx.capture.positions import POSITION_INPUTS, POSITION_MODALITIES, position_placeholders, token_positions, with_positions
from masq_fx.modality import NUM_MODALITIES, Modality
from masq_fx.nn.quant_linear import QuantLinear
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig
from masq_fx.recipes import preset
from masq_fx.transforms.cmc import CMCConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE_RTOL = 1e-5
LOGIT_RTOL = 1e-3
FLOAT_CMC = replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=4))
INT8_CMC = replace(preset("mas-init", 4, 8), cmc=CMCConfig(rank=4, factor_bits=8))


@pytest.fixture(scope="module")
def omni() -> CalibratedTiny:
    return calibrated_tiny("qwen2.5-omni-thinker")


# ----------------------------------------------------------------------------- positions


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), seq=st.integers(1, 12))
def test_positions_partition_the_non_text_tokens(seed, batch, seq):
    ids = torch.randint(0, NUM_MODALITIES, (batch, seq), generator=torch.Generator().manual_seed(seed))
    positions = token_positions(ids)
    flat = ids.reshape(-1)
    assert len(positions) == len(POSITION_MODALITIES) == len(POSITION_INPUTS)
    for modality, index in zip(POSITION_MODALITIES, positions):
        assert index.dtype == torch.long and bool((flat[index] == int(modality)).all())
        assert len(index) == int((flat == int(modality)).sum()) and bool((index.diff() > 0).all())
    covered = torch.cat(positions)
    assert sorted(covered.tolist()) == (flat != int(Modality.TEXT)).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- module


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(2, 3),
    text_row=st.integers(0, 2),
    rank=st.sampled_from([1, 4]),
    bits=st.sampled_from([None, 4, 8]),
    branch_input=st.sampled_from(["smoothed", "quantized"]),
    use_bias=st.booleans(),
)
def test_indexed_branches_equal_masked_branches(seed, rows, text_row, rank, bits, branch_input, use_bias):
    gen = torch.Generator().manual_seed(seed)
    module = QuantLinear(torch.randn(40, 48, generator=gen), torch.randn(40, generator=gen) if use_bias else None, "lin")
    text_row %= rows
    routing = torch.tensor([text_row, *torch.randint(0, rows, (NUM_MODALITIES - 1,), generator=gen).tolist()])
    module.set_scales(torch.exp(torch.randn(rows, 48, generator=gen)), routing)
    module.set_quantizers(weight=WeightQuantConfig(), activation=ActQuantConfig())
    module.use_text_weight(branch_input if bits is None else "smoothed")
    for row in range(rows):
        if row != text_row:
            module.set_branch(row, torch.randn(48, rank, generator=gen) * 0.1, torch.randn(rank, 40, generator=gen), bits=bits)
    module.freeze()
    lowered = Int8QuantLinear.from_quant_linear(module)
    x = torch.randn(2, 11, 48, generator=gen) * torch.exp(torch.randn(48, generator=gen))
    ids = torch.randint(0, NUM_MODALITIES, (2, 11), generator=gen)
    branched = {m for m in POSITION_MODALITIES if int(routing[m]) != text_row}
    assert {POSITION_MODALITIES[i] for i, _ in lowered.position_rows} == branched
    with torch.no_grad():
        masked, indexed = lowered(x, ids), lowered(x, ids, *token_positions(ids))
        reference = module(x, ids)
    assert (indexed - masked).abs().max() <= MODULE_RTOL * masked.abs().max()
    if bits is None:  # integer branches may flip a hidden code against the reference (tests/test_cmc_int8.py)
        assert (indexed - reference).abs().max() <= MODULE_RTOL * reference.abs().max()


def test_a_branch_on_texts_row_keeps_the_masked_layout():
    gen = torch.Generator().manual_seed(0)
    module = QuantLinear(torch.randn(8, 6, generator=gen), None, "lin")
    module.set_scales(torch.ones(2, 6), torch.tensor([1, 1, 0]))
    module.set_quantizers(weight=WeightQuantConfig(), activation=ActQuantConfig())
    module.use_text_weight()
    module.set_branch(1, torch.randn(6, 2, generator=gen), torch.randn(2, 8, generator=gen))
    lowered = Int8QuantLinear.from_quant_linear(module)
    assert not lowered.takes_positions
    x, ids = torch.randn(1, 5, 6, generator=gen), torch.tensor([[0, 1, 2, 0, 1]])
    with torch.no_grad():
        assert torch.equal(lowered(x, ids, *token_positions(ids)), lowered(x, ids))


# ----------------------------------------------------------------------------- graphs


@pytest.mark.parametrize("recipe", [FLOAT_CMC, INT8_CMC], ids=["float", "int8"])
def test_indexed_graph_takes_positions_and_matches_the_masked_graph(omni, recipe):
    context = omni.transformed(recipe)
    indexed, masked = copy.deepcopy(context.captured), copy.deepcopy(context.captured)
    lower_to_torchao(indexed)
    lower_to_torchao(masked, branch_layout="masked")
    assert [n.name for n in position_placeholders(indexed.graph_module)] == list(POSITION_INPUTS)
    assert not position_placeholders(masked.graph_module)
    users = {n for p in position_placeholders(indexed.graph_module) for n in p.users}
    compensated = [m for m in indexed.graph_module.modules() if isinstance(m, Int8QuantLinear) and m.branch_ranks]
    assert len(users) == len(compensated) == 12
    args = omni.inputs.args()
    full = with_positions(indexed.graph_module, args)
    assert len(full) == 6 and with_positions(masked.graph_module, args) == args
    with torch.no_grad():
        expected = masked(omni.inputs)
        eager = indexed(omni.inputs)  # the usual four inputs: the graph completes the positions itself
        explicit = indexed.graph_module(*full)
    assert torch.equal(eager, explicit)
    assert (eager - expected).abs().max() <= LOGIT_RTOL * expected.abs().max()


def test_compiled_indexed_graph_runs_media_and_text_only_prompts(omni):
    context = omni.transformed(FLOAT_CMC)
    lowered = copy.deepcopy(context.captured)
    lower_to_torchao(lowered)
    compiled = compile_graph(lowered)  # fullgraph=True: a graph break raises
    text_only = replace(omni.inputs, modality_ids=torch.zeros_like(omni.inputs.modality_ids))
    for inputs in (omni.inputs, text_only):
        with torch.no_grad():
            eager = lowered(inputs)
        out = compiled(*inputs.args())
        assert (out - eager).abs().max() <= 2e-2 * eager.abs().max()
    assert not any(len(p) for p in token_positions(text_only.modality_ids))
    # a plain torch.compile with the usual four inputs: the pre-hook adds the positions outside the graph
    bare = torch.compile(lowered.graph_module, fullgraph=True)
    with torch.no_grad():
        out, eager = bare(*omni.inputs.args()), lowered(omni.inputs)
    assert (out - eager).abs().max() <= 2e-2 * eager.abs().max()


def test_masked_layout_keeps_the_signature_and_bad_layouts_are_refused(omni):
    context = omni.transformed(FLOAT_CMC)
    gm = copy.deepcopy(context.captured.graph_module)
    report = lower_to_torchao(gm, branch_layout="masked")
    assert report.lowered and not position_placeholders(gm)
    with pytest.raises(ValueError, match="'indexed' or 'masked'"):
        lower_to_torchao(copy.deepcopy(context.captured), branch_layout="gathered")
