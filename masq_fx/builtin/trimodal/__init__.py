"""The built-in trimodal model: SmolLM2-135M-Instruct (frozen, real weights) with small trained vision and audio towers.

It is a real ``Qwen2_5OmniThinkerForConditionalGeneration`` (adapter family ``qwen2.5-omni-thinker``),
so ``capture(model)`` and ``adapter_for(model).decoder_inputs(batch)`` work on it as on any thinker.
The task: "What number is in the image?" / "What number was said?" (numbers 0-99), plus text.

>>> from masq_fx.models import adapter_for
>>> model, processor = load_trimodal()                        # no network, no espeak-ng
>>> evaluation = load_set("evaluation")                        # shipped images and log-mel features
>>> batch = processor(evaluation.samples("vision", 4))         # what model(**batch) takes
>>> batch = processor([processor.sample(image=img), processor.sample(waveform=wav), processor.sample(text="Hi")])
>>> acc = accuracy(eager_decoder(model), adapter_for(model), processor, evaluation.samples("audio"))
>>> acc = accuracy(capture(model), adapter_for(model), processor, ...)   # a captured (quantized) graph

``calibration_batches(processor)`` gives processed batches of the calibration split (vision, audio and
text interleaved) for ``adapter.decoder_inputs``.
"""

from masq_fx.builtin.trimodal.data import ShippedSet, calibration_batches, load_set
from masq_fx.builtin.trimodal.eval import accuracy, scores, text_perplexity
from masq_fx.builtin.trimodal.model import TrimodalConfig, load_trimodal
from masq_fx.builtin.trimodal.processing import Sample, TrimodalProcessor

__all__ = [
    "Sample",
    "ShippedSet",
    "TrimodalConfig",
    "TrimodalProcessor",
    "accuracy",
    "calibration_batches",
    "scores",
    "load_set",
    "load_trimodal",
    "text_perplexity",
]
