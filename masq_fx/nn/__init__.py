"""The modules a transformed graph holds: the quantized linear and the per-modality scale router."""
