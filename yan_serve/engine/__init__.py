"""Inference engine: batch-independent sampling from requests to tokens."""

from yan_serve.engine.sampler import Generation, GenerationRequest, Sampler

__all__ = ["Generation", "GenerationRequest", "Sampler"]
