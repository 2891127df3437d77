"""Evaluation of float and quantized models."""
