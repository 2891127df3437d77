"""Property tests of ModalityStats and ModalityObserver against direct torch reductions.

The hypothesis profile (``deadline=None``, ``derandomize=True``) is registered in ``conftest.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save
from torch import fx, nn

from masq_fx.calibration import ModalityObserver, ModalityStats
from masq_fx.modality import NUM_MODALITIES, Modality

ALL = tuple(Modality)


@st.composite
def batches(draw: st.DrawFn, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, S, C]``, ``ids [B, S]`` drawn from a random subset of modalities, ``valid [B, S]``."""
    batch, seq, channels = draw(st.integers(1, 3)), draw(st.integers(0, 7)), draw(st.integers(1, 5))
    modalities = draw(st.lists(st.sampled_from(ALL), min_size=1, max_size=NUM_MODALITIES, unique=True))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(batch, seq, channels, generator=gen) * 4).to(dtype)
    choice = torch.randint(len(modalities), (batch, seq), generator=gen)
    ids = torch.tensor([int(m) for m in modalities])[choice]
    valid = torch.rand(batch, seq, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return x, ids, valid


def stats_of(x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None = None, moments=ALL) -> ModalityStats:
    stats = ModalityStats.empty(x.shape[-1], moments)
    stats.update(x, ids, valid)
    return stats


def assert_same(a: ModalityStats, b: ModalityStats) -> None:
    """Exact equality of the order statistics and counts; moments equal up to float64 rounding."""
    for name in ("absmax", "min", "max", "count"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.moment_modalities == b.moment_modalities
    for m in a.moments:
        torch.testing.assert_close(a.moments[m], b.moments[m], rtol=1e-12, atol=1e-9)


@given(batches())
def test_update_matches_direct_reductions(batch) -> None:
    x, ids, valid = batch
    stats = stats_of(x, ids, valid, moments=(Modality.TEXT, Modality.AUDIO))
    for m in ALL:
        tokens = x[(ids == int(m)) & valid]
        row = stats.of(m)
        assert row.count == tokens.shape[0]
        if tokens.shape[0]:
            assert torch.equal(row.absmax, tokens.abs().amax(0))
            assert torch.equal(row.min, tokens.amin(0))
            assert torch.equal(row.max, tokens.amax(0))
        else:
            assert torch.equal(row.absmax, torch.zeros(x.shape[-1]))
            assert torch.equal(row.min, torch.full((x.shape[-1],), float("inf")))
            assert torch.equal(row.max, torch.full((x.shape[-1],), float("-inf")))
        if m == Modality.VISION:
            assert row.moment is None
        else:
            t = tokens.double()
            torch.testing.assert_close(row.moment, t.T @ t, rtol=1e-12, atol=1e-9)
    assert stats.present() == [m for m in ALL if ((ids == int(m)) & valid).any()]


@given(batches(), st.data())
def test_any_split_merged_in_any_order_equals_whole(batch, data) -> None:
    x, ids, _ = batch
    tokens, token_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
    n = tokens.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    bounds = list(zip([0, *cuts], [*cuts, n]))
    parts = [stats_of(tokens[lo:hi], token_ids[lo:hi]) for lo, hi in bounds]
    parts = data.draw(st.permutations(parts))
    while len(parts) > 1:  # a random merge tree: merge two random parts, either way round
        i, j = data.draw(st.lists(st.integers(0, len(parts) - 1), min_size=2, max_size=2, unique=True))
        merged = parts[i].merge(parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    whole = stats_of(x, ids)
    assert_same(parts[0], whole)
    assert_same(ModalityStats.merge_all(stats_of(tokens[lo:hi], token_ids[lo:hi]) for lo, hi in bounds), whole)
    streamed = ModalityStats.empty(x.shape[-1], ALL)
    for lo, hi in bounds:  # streaming updates into one object accumulate like merges
        streamed.update(tokens[lo:hi], token_ids[lo:hi])
    assert_same(streamed, whole)


@given(batches(), st.sampled_from(ALL))
def test_modalities_partition_all_tokens(batch, label) -> None:
    x, ids, valid = batch
    stats = stats_of(x, ids, valid)
    single = stats_of(x, torch.full_like(ids, int(label)), valid)
    whole, row = stats.all_tokens(), single.of(label)
    for name in ("absmax", "min", "max"):
        assert torch.equal(getattr(whole, name), getattr(row, name)), name
    assert whole.count == row.count == int(valid.sum())
    torch.testing.assert_close(whole.moment, row.moment, rtol=1e-12, atol=1e-9)
    assert single.present() == ([label] if valid.any() else [])


def test_all_tokens_moment_needs_every_present_modality() -> None:
    x = torch.randn(1, 4, 3)
    ids = torch.tensor([[0, 0, 1, 1]])
    assert stats_of(x, ids, moments=(Modality.TEXT,)).all_tokens().moment is None
    assert stats_of(x, torch.zeros_like(ids), moments=(Modality.TEXT,)).all_tokens().moment is not None
    assert stats_of(x, ids, moments=()).all_tokens().moment is None


@given(batches())
def test_padding_is_ignored(batch) -> None:
    x, ids, valid = batch
    garbage_x = torch.where(valid[..., None], x, torch.tensor(1e30))
    garbage_ids = torch.where(valid, ids, torch.tensor(-7))  # out of range, but never read
    assert_same(stats_of(garbage_x, garbage_ids, valid), stats_of(x[valid], ids[valid]))


@given(batches(dtype=torch.bfloat16))
def test_bfloat16_input(batch) -> None:
    x, ids, valid = batch
    stats = stats_of(x, ids, valid)
    assert stats.absmax.dtype == torch.float32 and stats.moments[Modality.TEXT].dtype == torch.float64
    assert_same(stats, stats_of(x.float(), ids, valid))


@given(batches())
def test_state_dict_round_trip_through_safetensors(batch) -> None:
    x, ids, valid = batch
    stats = stats_of(x, ids, valid, moments=(Modality.VISION,))
    state = stats.state_dict()
    assert set(state) == {"absmax", "min", "max", "count", "moment.vision"}
    assert_same(ModalityStats.from_state_dict(load(save(state))), stats)


def test_errors() -> None:
    stats = ModalityStats.empty(4)
    x, ids = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="expected 4 channels"):
        stats.update(torch.randn(2, 3, 5), ids)
    with pytest.raises(ValueError, match=r"modality ids must lie in \[0, 3\)"):
        stats.update(x, torch.full_like(ids, NUM_MODALITIES))
    with pytest.raises(ValueError, match="modality ids must lie"):
        stats.update(x, torch.full_like(ids, -1))
    with pytest.raises(ValueError, match="modality_ids shape"):
        stats.update(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="valid shape"):
        stats.update(x, ids, torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer"):
        stats.update(x, ids.float())
    assert int(stats.count.sum()) == 0, "a rejected update must not change the statistics"
    with pytest.raises(ValueError, match="channels"):
        stats.merge(ModalityStats.empty(5))
    with pytest.raises(ValueError, match="moments"):
        stats.merge(ModalityStats.empty(4, (Modality.TEXT,)))
    with pytest.raises(ValueError, match="at least one"):
        ModalityStats.merge_all([])
    with pytest.raises(ValueError, match="unknown"):
        ModalityStats.from_state_dict({**stats.state_dict(), "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="count must be int64"):
        ModalityStats.from_state_dict({**stats.state_dict(), "count": torch.zeros(NUM_MODALITIES)})


@given(batches())
def test_observer_skips_padding_and_resets(batch) -> None:
    x, ids, valid = batch
    observer = ModalityObserver(moment_modalities=("audio", Modality.TEXT))
    assert observer.stats is None
    assert observer(x, ids, valid.long()) is None
    assert observer(x, ids) is None
    expected = stats_of(x, ids, valid, moments=(Modality.TEXT, Modality.AUDIO)).merge(
        stats_of(x, ids, moments=(Modality.TEXT, Modality.AUDIO))
    )
    assert_same(observer.stats, expected)
    observer.reset()
    assert observer.stats is None


def _graph_with_unused_call(module: nn.Module) -> fx.GraphModule:
    """``f(x, ids) = x + 1`` with a call to ``module(x, ids)`` whose result nothing uses."""
    graph = fx.Graph()
    x, ids = graph.placeholder("x"), graph.placeholder("ids")
    graph.call_module("observer", (x, ids))
    graph.output(graph.call_function(torch.add, (x, 1)))
    return fx.GraphModule(nn.ModuleDict({"observer": module}), graph)


def test_observer_survives_dead_code_elimination() -> None:
    pure = _graph_with_unused_call(nn.Bilinear(4, 1, 1))  # control: an unused pure call is removed
    pure.graph.eliminate_dead_code()
    assert not any(n.op == "call_module" for n in pure.graph.nodes)

    gm = _graph_with_unused_call(ModalityObserver())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["observer"]
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x, torch.ones(2, 3, dtype=torch.long)), x + 1)
    assert gm.observer.stats.count.tolist() == [0, 6, 0]
