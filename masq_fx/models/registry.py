"""Find the adapter of a model by its class."""

from __future__ import annotations

from torch import nn

from masq_fx.errors import MasqFxError
from masq_fx.models.base import ModelAdapter

_ADAPTERS: list[type[ModelAdapter]] = []


class UnsupportedModelError(MasqFxError, TypeError):
    """The model's class is handled by no registered adapter."""


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter discoverable by :func:`adapter_for`."""
    _ADAPTERS.append(cls)
    return cls


def supported_families() -> list[str]:
    return [cls.family for cls in _ADAPTERS]


def rotatable_families() -> list[str]:
    """The supported families whose residual stream rotations and LaRoSA can rotate."""
    return [cls.family for cls in _ADAPTERS if cls.rotation_refusal is None]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` naming the supported families."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise _unsupported(type(model))


def check_supported(model_class: type) -> None:
    """Raise :class:`UnsupportedModelError` unless some adapter handles ``model_class`` (before building a model of it)."""
    if not any(issubclass(model_class, cls.model_classes) for cls in _ADAPTERS):
        raise _unsupported(model_class)


def _unsupported(model_class: type) -> UnsupportedModelError:
    families = "\n".join(
        f"  - {cls.family}: {', '.join(c.__name__ for c in cls.model_classes)}" for cls in _ADAPTERS
    )
    return UnsupportedModelError(
        f"masq_fx has no adapter for {model_class.__name__}. Supported families:\n{families}\n"
        "To add one, subclass masq_fx.models.ModelAdapter (set `family`, `model_classes`, "
        "`position_rows`; implement `language_model()` and `modality_tokens()`) and decorate it "
        "with @masq_fx.models.register_adapter."
    )
