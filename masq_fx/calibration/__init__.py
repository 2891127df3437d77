"""Stage 2: observers on every linear input and the calibration run that turns them into per-modality statistics."""

from masq_fx.calibration.calibrate import Calibrate, InsertObservers, calibration_tokens, observe
from masq_fx.calibration.observer import ModalityObserver
from masq_fx.calibration.stats import ChannelStats, ModalityStats

__all__ = ["Calibrate", "ChannelStats", "InsertObservers", "ModalityObserver", "ModalityStats", "calibration_tokens", "observe"]
