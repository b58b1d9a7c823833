"""Preference data: load, validate, render and tokenize preference pairs.

(Work in progress — the public types below are the contract other modules code against.)
"""

from __future__ import annotations

from dataclasses import dataclass

# Bad-row reasons, in a fixed order: the store keeps ``status = 2 + BAD_REASONS.index(reason)``.
BAD_REASONS: tuple[str, ...] = (
    "missing_field",  # a required column is absent or None
    "empty_field",  # a required string/list is empty or whitespace only
    "not_a_string",  # a field that must be text is not
    "malformed_messages",  # a message list that is not [{role, content}, ...] with known roles
    "prompt_mismatch",  # chosen/rejected message lists do not share the same prompt turns
    "no_shared_prompt",  # HH-style transcripts without a shared "Assistant:" prefix
    "identical_responses",  # chosen == rejected
    "too_long",  # over max_length / max_prompt_length under over_length='drop'
    "empty_after_truncation",  # a response with no tokens left after truncation
)


@dataclass(frozen=True)
class TokenizedPair:
    """One valid preference pair, tokenized.

    The full chosen sequence is ``prompt_ids + chosen_ids`` (likewise rejected).  ``chosen_ids`` are
    exactly the response tokens (ending in EOS unless truncated); the log-prob of the response is the
    sum over these positions.
    """

    index: int  # source row index (global, in dataset order)
    uid: bytes  # 16-byte content hash of (prompt, chosen, rejected)
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


@dataclass(frozen=True)
class BadRow:
    index: int  # source row index
    reason: str  # one of BAD_REASONS
    field: str | None  # the offending field, when there is one
    detail: str  # human-readable detail

    def describe(self, source: str) -> str:
        where = f"field '{self.field}'" if self.field else "row"
        return f"{source}: row {self.index}: {where}: {self.reason}: {self.detail}"
