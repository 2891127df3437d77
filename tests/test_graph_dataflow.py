"""Smoothing groups are derived from the exported graph's dataflow, not from module names."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masq_fx.capture.dataflow import SmoothingGroup, input_node, smoothing_groups, to_networkx
from masq_fx.capture.decoder import annotate, capture, iter_linears

_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_TEXT))


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_TEXT))


def _qwen2_5_vl() -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=512)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])  # fmt: skip
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                           vision_start_token_id=252, vision_end_token_id=253)  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _expected_hf_groups(num_layers: int) -> list[tuple[str, tuple[str, ...], str | None, int]]:
    expected = []
    for i in range(num_layers):
        attn, mlp, norm = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"decoder.layers.{i}."
        expected += [
            ("norm", (attn + "q_proj", attn + "k_proj", attn + "v_proj"), norm + "input_layernorm.weight", i),
            ("attention", (attn + "o_proj",), None, i),
            ("norm", (mlp + "gate_proj", mlp + "up_proj"), norm + "post_attention_layernorm.weight", i),
            ("activation", (mlp + "down_proj",), None, i),
        ]
    return expected


def _summary(groups: list[SmoothingGroup]) -> list[tuple[str, tuple[str, ...], str | None, int | None]]:
    return [(g.kind, g.linears, g.norm_weight, g.layer) for g in groups]


@pytest.mark.parametrize("build", [_llama, _qwen2, _qwen2_5_vl], ids=["llama", "qwen2", "qwen2_5_vl"])
def test_hf_decoder_has_four_groups_per_layer(build) -> None:
    torch.manual_seed(0)
    gm = capture(build()).graph_module
    groups = smoothing_groups(gm)

    assert _summary(groups) == _expected_hf_groups(2)
    assert all(g.norm_bias is None for g in groups)
    covered = [name for g in groups for name in g.linears]
    assert sorted(covered) == sorted(name for name, _ in iter_linears(gm) if name != "lm_head")
    nodes = {n.name: n for n in gm.graph.nodes}
    linears = dict(iter_linears(gm))
    for g in groups:
        assert all(input_node(linears[name]).name == g.source for name in g.linears)
        if g.kind == "attention":
            assert nodes[g.source].target is torch.ops.aten.scaled_dot_product_attention.default

    head = smoothing_groups(gm, include_head=True)[-1]
    assert _summary([head]) == [("norm", ("lm_head",), "decoder.norm.weight", None)]


def test_to_networkx_mirrors_the_fx_graph() -> None:
    gm = capture(_llama()).graph_module
    graph = to_networkx(gm)
    assert graph.number_of_nodes() == len(gm.graph.nodes)
    q_proj = dict(iter_linears(gm))["layers.0.self_attn.q_proj"]
    assert graph.nodes[q_proj.name]["module"] == "layers.0.self_attn.q_proj"
    assert set(graph.predecessors(q_proj.name)) == {a.name for a in q_proj.all_input_nodes}


class _HandLayerNorm(nn.Module):
    """LayerNorm written out with var_mean / sqrt / div, so the graph holds the decomposed pattern."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class _MisnamedLayer(nn.Module):
    """A pre-norm block whose module names say the opposite of what each module computes."""

    def __init__(self, dim: int = 32, ffn: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.post_attention_layernorm = nn.LayerNorm(dim)  # the attention pre-norm (aten.layer_norm)
        self.input_layernorm = _HandLayerNorm(dim)  # the MLP pre-norm
        self.self_attn = nn.ModuleDict({
            "k_proj": nn.Linear(dim, dim),  # query
            "v_proj": nn.Linear(dim, dim),  # key
            "o_proj": nn.Linear(dim, dim),  # value
            "q_proj": nn.Linear(ffn, dim),  # MLP down projection
        })  # fmt: skip
        self.mlp = nn.ModuleDict({
            "gate_proj": nn.Linear(dim, dim),  # attention output projection
            "up_proj": nn.Linear(dim, ffn),  # gate branch
            "down_proj": nn.Linear(dim, ffn),  # up branch
            "router": nn.Linear(dim, dim),  # reads the residual stream, no norm
        })  # fmt: skip

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        b, s, d = h.shape
        x = self.post_attention_layernorm(h)
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (attn.k_proj, attn.v_proj, attn.o_proj))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        h = h + mlp.gate_proj((probs @ v).transpose(1, 2).reshape(b, s, d))
        x = self.input_layernorm(h)
        h = h + attn.q_proj(F.gelu(mlp.up_proj(x)) * mlp.down_proj(x))
        return h + mlp.router(h)


class _Decoder(nn.Module):
    def __init__(self, num_layers: int, dim: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_MisnamedLayer(dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class _Model(nn.Module):
    def __init__(self, num_layers: int = 2, dim: int = 32) -> None:
        super().__init__()
        self.decoder = _Decoder(num_layers, dim)
        self.lm_head = nn.Linear(dim, 50, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.decoder(h))


def test_groups_follow_dataflow_not_module_names() -> None:
    torch.manual_seed(0)
    model = _Model().eval()
    gm = torch.export.export(model, (torch.randn(2, 5, 32),), strict=False).module()
    annotate(gm)

    groups = smoothing_groups(gm, include_head=True)
    expected = []
    for i in range(2):
        attn, mlp, p = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"decoder.layers.{i}."
        ln, hand = p + "post_attention_layernorm.", p + "input_layernorm."
        expected += [
            ("norm", (attn + "k_proj", attn + "v_proj", attn + "o_proj"), ln + "weight", ln + "bias", i),
            ("attention", (mlp + "gate_proj",), None, None, i),
            ("norm", (mlp + "up_proj", mlp + "down_proj"), hand + "weight", hand + "bias", i),
            ("activation", (attn + "q_proj",), None, None, i),
            ("other", (mlp + "router",), None, None, i),
        ]
    expected.append(("norm", ("lm_head",), "decoder.norm.weight", "decoder.norm.bias", None))
    assert [(g.kind, g.linears, g.norm_weight, g.norm_bias, g.layer) for g in groups] == expected


def test_capture_finds_the_sites_once_and_copies_keep_them():
    from masq_fx.capture import capture
    from masq_fx.models.tiny import tiny_model

    captured = capture(tiny_model("qwen2.5-vl", seed=0).model)
    float_graph = copy.deepcopy(captured.graph_module)
    assert list(captured.sites) == smoothing_groups(float_graph, include_head=True)
    assert captured.groups() == smoothing_groups(float_graph) and captured.groups(include_head=True)[-1].linears == ("lm_head",)
    twin = captured.copy()
    assert twin.sites == captured.sites and twin.graph_module is not captured.graph_module
    assert all(a is b for a, b in zip(twin.float_tensors, captured.float_tensors))  # float weights shared, not copied
