"""Decoding settings of one request, and picking the next token of every running row at once.

Temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, the
nucleus of probability top_p is kept (the most likely token always is), and the token is drawn
with the request's own generator: a request with a seed draws the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from lora_dist.serving.errors import RequestError

MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes; invalid values raise RequestError naming the field."""

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 for greedy decoding; higher is more random."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's generator; None draws one at random."""
    stop: tuple[str, ...] = ()
    """Strings that end the generation; the text returned stops before them."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (for benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise RequestError("max_tokens must be an integer", param="max_tokens")
        if self.max_tokens < 1:
            raise RequestError(
                f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(
                f"temperature must be between 0 and 2, got {self.temperature}", param="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise RequestError(
                f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed`, or at random when there is none."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token id from a row of logits (vocabulary,) with temperature and top-p."""
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the likelier tokens
        sorted_probs = torch.where(before < params.top_p, sorted_probs, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """The next token of each row of `logits` (rows, vocabulary)."""
    picked = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            picked[row] = sample_row(logits[row], p, gen)
    return picked
