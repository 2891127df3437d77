"""Shared fixtures: a hypothesis profile for tensor code and the real SmolLM2 model, loaded once.

The data generators of the tri-modal task (``benchmarks/fixtures``) are importable, for the tests of their splits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

pytest_plugins = ["helpers"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fixtures"))

settings.register_profile(
    "masq_fx",
    deadline=None,
    derandomize=True,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("masq_fx")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (model, tokenizer), loaded once per test session."""
    from masq_fx.builtin.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_captured(smollm2):
    """SmolLM2's decoder captured once per test session."""
    from masq_fx.capture.decoder import capture

    model, _ = smollm2
    return capture(model)
