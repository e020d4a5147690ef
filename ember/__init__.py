"""ember: a local LLM inference engine and chat server on PyTorch.

The public surface: `load` a model, sample with `SamplingParams`, drive many
requests through an `Engine`.
"""

from ember.engine.engine import Engine
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.errors import EmberError
from ember.handle import ModelHandle, load
from ember.sampling import SamplingParams

__all__ = ["Engine", "EmberError", "GenerationRequest", "ModelHandle", "SamplingParams", "StepOutput", "load"]
__version__ = "0.1.0"
