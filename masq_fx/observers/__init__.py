"""Per-modality activation statistics and the FX observer module that collects them."""

from masq_fx.observers.observer import ModalityObserver
from masq_fx.observers.stats import ChannelStats, ModalityStats

__all__ = ["ChannelStats", "ModalityObserver", "ModalityStats"]
