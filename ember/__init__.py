"""ember: a local LLM inference engine and chat server on PyTorch.

The public surface: `load` a model, sample with `SamplingParams`, drive many
requests through an `Engine`. The names are imported on first use, so a
command that needs no model (`ember pull`, `ember list`) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "ember.engine.engine",
    "EmberError": "ember.errors",
    "GenerationRequest": "ember.engine.sequence",
    "ModelHandle": "ember.handle",
    "SamplingParams": "ember.sampling",
    "StepOutput": "ember.engine.sequence",
    "load": "ember.handle",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
