"""Inference engine: batch-independent sampling from requests to tokens."""

from yan_serve.engine.requests import EngineRequest, Runner, Scored, TaskOptions, Worker
from yan_serve.engine.sampler import Generation, GenerationRequest, Sampler

__all__ = [
    "EngineRequest",
    "Generation",
    "GenerationRequest",
    "Runner",
    "Sampler",
    "Scored",
    "TaskOptions",
    "Worker",
]
