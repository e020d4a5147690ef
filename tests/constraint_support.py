"""Helpers for the constrained-decoding tests: run several requests through one engine, batched."""

from __future__ import annotations

from dataclasses import dataclass

from ember.engine.sequence import GenerationRequest, StepOutput

MAX_STEPS = 2_000  # a bound on any test's stepping loop, so a bug cannot hang the suite

# Ten varied prompts, some asking for JSON and some not: the constraint must make every reply parse.
JSON_PROMPTS = [
    "Describe a cat as a JSON object.",
    "Give me your favourite book as JSON.",
    "What is the weather like today? Answer in JSON.",
    "List three fruits and their colours.",
    "Write a short poem.",
    "Who are you?",
    "Make a shopping list for a picnic.",
    "Tell me about Paris.",
    "Convert 10 km to miles.",
    "Suggest a name for a dog.",
]


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    final: StepOutput

    @property
    def finish_reason(self) -> str | None:
        return self.final.finish_reason


def run_batch(engine, requests: list[GenerationRequest]) -> dict[str, Finished]:
    """Queue every request, step the engine until all finish; each request's text and last output."""
    outputs: dict[str, list[StepOutput]] = {request.request_id: [] for request in requests}
    for request in requests:
        engine.add_request(request, on_output=outputs[request.request_id].append)
    for _ in range(MAX_STEPS):
        if all(pieces and pieces[-1].finished for pieces in outputs.values()):
            break
        engine.step()
    else:
        raise AssertionError("the engine did not finish the requests within the step bound")
    return {
        request_id: Finished(
            "".join(piece.text for piece in pieces),
            [piece.token_id for piece in pieces if piece.token_id is not None],
            pieces[-1],
        )
        for request_id, pieces in outputs.items()
    }


def chat_prompt(handle, text: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat with the model's own template."""
    from ember.chat_template import ChatTemplate

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return handle.encode(ChatTemplate.for_tokenizer(handle.tokenizer).render(messages))
