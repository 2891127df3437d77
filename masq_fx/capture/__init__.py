"""Stage 1: the language decoder as an exported graph, its dataflow (smoothing groups) and its token-position inputs."""

from masq_fx.capture.decoder import CapturedDecoder, capture

__all__ = ["CapturedDecoder", "capture"]
