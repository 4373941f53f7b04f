"""YAN modules: embeddings and attention blocks, encoder, flow trunk/experts/gate, decoder."""

from yan_serve.model.yan import YAN

__all__ = ["YAN"]
