"""Adapters for training loops you do not write yourself.

* :mod:`flora.integrations.hf` — Hugging Face ``transformers.Trainer`` (an optimizer factory
  and an accumulation callback) and ``accelerate`` (``accelerate_sync``).

Each is imported only when used; the core package needs only torch.
"""
