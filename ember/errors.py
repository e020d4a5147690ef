"""Errors a user can act on.

Every failure that comes from user input (a path, a file, a prompt, a request)
is raised as an `EmberError` subclass with a one-line message; the CLI prints
that line and exits non-zero, the server turns it into an HTTP error.
"""


class EmberError(Exception):
    """Base class for errors whose message is meant for the user."""


class ModelLoadError(EmberError):
    """The model files are missing, truncated, corrupt or of an unsupported kind."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one ember implements."""


class ContextOverflowError(EmberError):
    """A prompt (or a single message) does not fit in the model's context."""

    def __init__(self, message: str, num_prompt_tokens: int = 0, context_length: int = 0):
        super().__init__(message)
        self.num_prompt_tokens = num_prompt_tokens
        self.context_length = context_length


class InvalidRequestError(EmberError):
    """A request's parameters are out of range or inconsistent."""


class ConstraintViolationError(EmberError):
    """A constrained sequence cannot go on (a token outside the mask, or a grammar no token can follow)."""


class GenerationError(EmberError):
    """Generating a reply failed inside the engine (the text so far is kept). `kind` is the engine's
    `FailureKind` value: whether the request caused it (a constraint, settings, size) or ember did."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind
