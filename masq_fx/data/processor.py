"""A model folder's own HF processor, loadable without torchvision.

transformers loads every sub-processor of a processor, and the video processors of the Qwen-VL and
Omni families need torchvision, which a CPU-only install often lacks (PyPI's torchvision wheels are
built against CUDA torch). Text, image and audio processing never touch the video processor, so
without torchvision :func:`load_processor` builds the folder's processor class with that one
sub-processor left out; processing a video then fails with transformers' own error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from masq_fx.errors import InputError

#: files that mark a folder as holding a processor (not only a tokenizer)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def has_processor(folder: Path) -> bool:
    """Whether ``folder`` holds a processor's configuration (a multimodal model's folder does)."""
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def _without_video(cls: type) -> type:
    """``cls`` with no ``video_processor`` among the sub-processors it loads and checks."""

    @classmethod  # type: ignore[misc]
    def get_attributes(subclass: type) -> list[str]:
        return [a for a in cls.get_attributes() if a != "video_processor"]  # type: ignore[attr-defined]

    return type(cls.__name__, (cls,), {"get_attributes": get_attributes, "__module__": cls.__module__})


def _processor_class(folder: Path) -> type | None:
    """The processor class the folder names (``processor_class`` of its processor or tokenizer files), else its config's."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    for name in (*PROCESSOR_FILES, "tokenizer_config.json"):
        path = folder / name
        named = json.loads(path.read_text()).get("processor_class") if path.is_file() else None
        if isinstance(named, str) and hasattr(transformers, named):
            return cast(type, getattr(transformers, named))
    config = AutoConfig.from_pretrained(str(folder))
    return cast(type, PROCESSOR_MAPPING[type(config)]) if type(config) in PROCESSOR_MAPPING else None


def load_processor(folder: Path) -> Any:
    """``AutoProcessor.from_pretrained(folder)``; without torchvision, the same class without its video processor."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        cls = None if is_torchvision_available() else _processor_class(folder)
        if cls is None:
            return AutoProcessor.from_pretrained(str(folder))
        if "video_processor" in cls.get_attributes():  # type: ignore[attr-defined]
            cls = _without_video(cls)
        return cls.from_pretrained(str(folder))  # type: ignore[attr-defined]
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise InputError(
            f"{folder} has no usable processor ({first}): copy the model's processor and tokenizer files "
            "(preprocessor_config.json, tokenizer files, chat template) into it"
        ) from None
