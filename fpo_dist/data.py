"""Preference data: load, validate, render and tokenize preference pairs.

Three schemas are understood (auto-detected, or set with ``data.schema``):

- ``strings``: ``prompt``, ``chosen``, ``rejected`` are strings.
- ``messages`` (UltraFeedback-binarized): ``chosen``/``rejected`` are message lists ``[{role, content}]``
  that share the prompt turns and end with one assistant turn; multi-turn prompts are allowed.
- ``transcripts`` (HH-RLHF): ``chosen``/``rejected`` are whole ``\\n\\nHuman: … \\n\\nAssistant: …``
  transcripts with a shared prefix; the prompt is everything up to the last shared ``Assistant:``.

Other layouts map their column names with ``data.columns`` (e.g. ``{prompt: question}``).

Every row is normalised to ``(prompt messages, chosen text, rejected text)`` and rendered with the
tokenizer's chat template (``add_generation_prompt=True``) or, without one, the plain template::

    <BOS>User: {content}\\n\\nAssistant: {content}\\n\\n … User: {content}\\n\\nAssistant:␠

(``System:`` for system turns).  Prompt and responses are tokenized separately and concatenated, so
the response tokens are exactly the tokens of the response (no merge across the boundary) and each
response ends with EOS.  Rows that cannot be used become :class:`BadRow` records with a reason from
:data:`BAD_REASONS`; with ``on_bad_row: fail`` the first one raises :class:`BadRowError`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fpo_dist.config import DataConfig

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

ROLES = ("system", "user", "assistant")
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_GENERATION_PREFIX = "Assistant: "
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


class DataError(ValueError):
    """The data source cannot be read or understood at all."""


class UnusableRow(Exception):
    """Internal: ``args = (reason, field, detail)`` of a row that cannot be used."""


class BadRowError(DataError):
    """A bad row under ``on_bad_row: fail``; the message names the file, row and field."""

    def __init__(self, message: str, bad: "BadRow"):
        super().__init__(message)
        self.bad = bad


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

    def describe(self, where: str) -> str:
        """``where`` names the file and row, e.g. ``train.jsonl row 12``."""
        what = f"field '{self.field}'" if self.field else "row"
        return f"{where}: {what}: {self.reason}: {self.detail}"


@dataclass(frozen=True)
class Example:
    """A normalised, validated (but untokenized) preference pair."""

    prompt: tuple[dict, ...]  # messages [{role, content}], ending with a non-assistant turn
    chosen: str
    rejected: str

    @property
    def uid(self) -> bytes:
        payload = json.dumps(
            {"prompt": [dict(m) for m in self.prompt], "chosen": self.chosen, "rejected": self.rejected},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).digest()[:16]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class RowSource:
    """A loaded dataset plus what is needed to name a row in an error message."""

    dataset: Any  # datasets.Dataset
    name: str  # hub id/split, or the file list
    schema: str  # strings | messages | transcripts
    columns: dict[str, str]  # canonical field -> dataset column
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, first global row) for local files

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        """Human-readable location of global row ``index``: file and row within the file."""
        if self.files:
            path, first = self.files[0]
            for p, f in self.files:
                if f <= index:
                    path, first = p, f
            return f"{path} row {index - first}"
        return f"{self.name} row {index}"


def local_files(source: str) -> list[str] | None:
    """The local data files named by ``source`` (comma-separated paths, globs or directories), or
    None when ``source`` is a hub dataset id."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    files: list[str] = []
    for part in parts:
        matches = sorted(glob.glob(os.path.expanduser(part)))
        if not matches:
            if part.endswith(DATA_FILE_SUFFIXES) or len(parts) > 1:
                raise DataError(f"data file not found: {part}")
            return None  # a hub id
        for m in matches:
            if os.path.isdir(m):
                files.extend(sorted(str(p) for p in Path(m).iterdir() if p.name.endswith(DATA_FILE_SUFFIXES)))
            else:
                files.append(m)
    bad = [f for f in files if not f.endswith(DATA_FILE_SUFFIXES)]
    if bad or not files:
        raise DataError(f"unsupported or no data file(s) in {source!r}: use .json, .jsonl or .parquet")
    return files


def load_source(cfg: DataConfig) -> RowSource:
    """Open the dataset named by ``cfg`` (hub id + split + revision, or local files) without reading rows."""
    import datasets

    datasets.logging.set_verbosity_error()
    files = local_files(cfg.source)
    if files is None:
        try:
            ds = datasets.load_dataset(cfg.source, split=cfg.split, revision=cfg.revision)
        except Exception as e:  # offline, wrong id, wrong split: say which
            raise DataError(
                f"cannot load dataset '{cfg.source}' (split '{cfg.split}', revision {cfg.revision!r}): {e}. "
                "For offline use pass local .json/.jsonl/.parquet files as data.source."
            ) from e
        name, spans = f"{cfg.source}[{cfg.split}]", []
    else:
        parts, spans, first = [], [], 0
        for path in files:
            kind = "parquet" if path.endswith(".parquet") else "json"
            try:
                part = datasets.load_dataset(kind, data_files=path, split="train")
            except Exception as e:
                raise DataError(f"{path}: cannot be read as {kind}: {e}") from e
            spans.append((path, first))
            first += len(part)
            parts.append(part)
        try:
            ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        except Exception as e:
            raise DataError(f"data files {files} have different columns/types and cannot be combined: {e}") from e
        name = ",".join(files)
    if cfg.max_rows is not None and cfg.max_rows < len(ds):
        ds = ds.select(range(cfg.max_rows))
    columns = {f: cfg.columns.get(f, f) for f in ("prompt", "chosen", "rejected")}
    schema = cfg.schema if cfg.schema != "auto" else detect_schema(ds, columns, name)
    need = ["chosen", "rejected"] + (["prompt"] if schema == "strings" else [])
    missing = [columns[f] for f in need if columns[f] not in ds.column_names]
    if missing:
        raise DataError(
            f"{name}: schema '{schema}' needs column(s) {missing}; the data has {ds.column_names}. "
            "Map other names with data.columns, e.g. --data.columns '{prompt: question}'"
        )
    return RowSource(dataset=ds, name=name, schema=schema, columns=columns, files=spans)


def detect_schema(ds, columns: dict[str, str], name: str) -> str:
    """Guess the schema from the first rows whose ``chosen`` field is usable."""
    chosen_col = columns["chosen"]
    if chosen_col not in ds.column_names:
        raise DataError(
            f"{name}: no '{chosen_col}' column (columns: {ds.column_names}); map it with data.columns"
        )
    for i in range(min(len(ds), 32)):
        value = ds[i][chosen_col]
        if isinstance(value, list):
            return "messages"
        if isinstance(value, str) and value.strip():
            return "strings" if columns["prompt"] in ds.column_names else "transcripts"
    raise DataError(f"{name}: cannot detect the schema from the first rows; set data.schema explicitly")


# --------------------------------------------------------------------------------------------------
# Normalising one row
# --------------------------------------------------------------------------------------------------


def normalize_row(row: dict, schema: str, columns: dict[str, str]) -> Example | tuple[str, str, str]:
    """Validate one raw row. Returns an :class:`Example` or ``(reason, field, detail)``."""
    get = {f: row.get(columns[f]) for f in ("prompt", "chosen", "rejected")}
    if schema == "strings":
        for f in ("prompt", "chosen", "rejected"):
            err = _check_text(get[f], f)
            if err:
                return err
        prompt: tuple[dict, ...] = ({"role": "user", "content": get["prompt"]},)
        chosen, rejected = get["chosen"], get["rejected"]
    elif schema == "messages":
        turns = {}
        for f in ("chosen", "rejected"):
            msgs = get[f]
            if msgs is None:
                return ("missing_field", f, "no value")
            err = _check_messages(msgs, f)
            if err:
                return err
            turns[f] = msgs
        c, r = turns["chosen"], turns["rejected"]
        if [_msg(m) for m in c[:-1]] != [_msg(m) for m in r[:-1]]:
            return ("prompt_mismatch", "rejected", "chosen and rejected do not share the same prompt turns")
        if not c[:-1]:
            p = get["prompt"]
            if not isinstance(p, str) or not p.strip():
                return ("malformed_messages", "chosen", "no prompt turns before the response and no 'prompt' text")
            prompt = ({"role": "user", "content": p},)
        else:
            prompt = tuple(_msg(m) for m in c[:-1])
        chosen, rejected = c[-1]["content"], r[-1]["content"]
    elif schema == "transcripts":
        for f in ("chosen", "rejected"):
            err = _check_text(get[f], f)
            if err:
                return err
        try:
            prompt, chosen, rejected = split_transcripts(get["chosen"], get["rejected"])
        except UnusableRow as e:
            return e.args
        for f, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                return ("empty_field", f, "the response after the shared prompt is empty")
    else:  # pragma: no cover - validated by config
        raise DataError(f"unknown schema '{schema}'")
    if prompt[-1]["role"] == "assistant":
        return ("malformed_messages", "chosen", "the prompt must end with a user or system turn")
    if chosen == rejected:
        return ("identical_responses", "rejected", "chosen and rejected responses are identical")
    return Example(prompt=prompt, chosen=chosen, rejected=rejected)


def _check_text(value: Any, name: str) -> tuple[str, str, str] | None:
    if value is None:
        return ("missing_field", name, "no value")
    if not isinstance(value, str):
        return ("not_a_string", name, f"expected text, got {type(value).__name__}")
    if not value.strip():
        return ("empty_field", name, "empty text")
    return None


def _msg(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


def _check_messages(msgs: Any, name: str) -> tuple[str, str, str] | None:
    if not isinstance(msgs, list):
        return ("malformed_messages", name, f"expected a list of {{role, content}} messages, got {type(msgs).__name__}")
    if not msgs:
        return ("empty_field", name, "empty message list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return ("malformed_messages", name, f"message {j} is not a {{role, content}} mapping: {m!r:.80}")
        if m["role"] not in ROLES:
            return ("malformed_messages", name, f"message {j} has unknown role {m['role']!r} (allowed: {ROLES})")
        if m["content"] is None:
            return ("missing_field", name, f"message {j} has no content")
        if not isinstance(m["content"], str):
            return ("not_a_string", name, f"message {j} content is {type(m['content']).__name__}, not text")
    if msgs[-1]["role"] != "assistant":
        return ("malformed_messages", name, "the last message must be the assistant's response")
    if not msgs[-1]["content"].strip():
        return ("empty_field", name, "the assistant response is empty")
    return None


def split_transcripts(chosen: str, rejected: str):
    """HH-RLHF: split two transcripts into (prompt messages, chosen response, rejected response).

    The prompt is the shared prefix up to and including its last ``\\n\\nAssistant:``; the responses
    are the remainders with one leading space removed.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen[:n].rfind(HH_ASSISTANT)  # the last marker lying wholly inside the shared prefix
    if cut < 0:
        raise UnusableRow("no_shared_prompt", "chosen", "no shared prefix ending in '\\n\\nAssistant:'")
    prompt_text = chosen[: cut + len(HH_ASSISTANT)]
    resp_c = chosen[cut + len(HH_ASSISTANT) :]
    resp_r = rejected[cut + len(HH_ASSISTANT) :]
    resp_c = resp_c[1:] if resp_c.startswith(" ") else resp_c
    resp_r = resp_r[1:] if resp_r.startswith(" ") else resp_r
    turns = _parse_hh_turns(prompt_text[: -len(HH_ASSISTANT)])
    if not turns:
        raise UnusableRow("no_shared_prompt", "chosen", "the shared prefix has no Human turn")
    return tuple(turns), resp_c, resp_r


def _parse_hh_turns(text: str) -> list[dict]:
    turns: list[dict] = []
    pos = 0
    markers = ((HH_HUMAN, "user"), (HH_ASSISTANT, "assistant"))
    while True:
        nxt = [(text.find(m, pos), m, role) for m, role in markers]
        nxt = [t for t in nxt if t[0] >= 0]
        if not nxt:
            break
        start, marker, role = min(nxt)
        if turns:
            turns[-1]["content"] = text[pos:start].strip()
        elif text[:start].strip():
            turns.append({"role": "system", "content": text[:start].strip()})
        turns.append({"role": role, "content": ""})
        pos = start + len(marker)
    if turns:
        turns[-1]["content"] = text[pos:].strip()
    return turns


# --------------------------------------------------------------------------------------------------
# Rendering and tokenization
# --------------------------------------------------------------------------------------------------


def uses_chat_template(tokenizer, cfg: DataConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has:
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
    return has if cfg.template == "auto" else cfg.template == "chat"


def render_prompt_plain(messages: Sequence[dict]) -> str:
    """The documented plain template (no BOS here: the tokenizer adds it)."""
    body = "".join(f"{PLAIN_ROLE_NAMES[m['role']]}: {m['content']}\n\n" for m in messages)
    return body + PLAIN_GENERATION_PREFIX


def encode_prompt(tokenizer, messages: Sequence[dict], chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(render_prompt_plain(messages), add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; responses must end with EOS")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], cfg: DataConfig, bos_id: int | None
) -> tuple[list[int], list[int], list[int]] | tuple[str, str, str]:
    """Apply ``max_prompt_length`` then ``max_length``; returns the ids or ``(reason, field, detail)``.

    The prompt keeps its end (``keep_end``, default; a leading BOS is kept) or its start; responses are
    cut at the end.  Under ``over_length: drop`` anything over a limit is a ``too_long`` bad row.
    """
    mp, ml = cfg.max_prompt_length, cfg.max_length
    if len(prompt) > mp:
        if cfg.over_length == "drop":
            return ("too_long", "prompt", f"{len(prompt)} prompt tokens > max_prompt_length {mp}")
        if cfg.truncation_mode == "keep_start":
            prompt = prompt[:mp]
        elif bos_id is not None and prompt[0] == bos_id:
            prompt = [bos_id] + prompt[len(prompt) - (mp - 1) :]
        else:
            prompt = prompt[len(prompt) - mp :]
    budget = ml - len(prompt)
    out = []
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if len(resp) > budget:
            if cfg.over_length == "drop":
                return ("too_long", name, f"{len(prompt)} + {len(resp)} tokens > max_length {ml}")
            resp = resp[: max(budget, 0)]
        if not resp:
            return ("empty_after_truncation", name, f"no response tokens left within max_length {ml}")
        out.append(resp)
    return prompt, out[0], out[1]


@dataclass
class RangeResult:
    """The outcome of tokenizing rows ``[start, stop)``: every row is either a pair or a bad row."""

    start: int
    stop: int
    pairs: list[TokenizedPair]
    bad: list[BadRow]


class PairTokenizer:
    """Turns raw rows into :class:`TokenizedPair` objects; usable per row range (cache workers)."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.chat = uses_chat_template(tokenizer, cfg)

    def example(self, row: dict, index: int, source: RowSource) -> TokenizedPair | BadRow:
        norm = normalize_row(row, source.schema, source.columns)
        if not isinstance(norm, Example):
            return BadRow(index, *norm)
        prompt = encode_prompt(self.tokenizer, norm.prompt, self.chat)
        chosen = encode_response(self.tokenizer, norm.chosen)
        rejected = encode_response(self.tokenizer, norm.rejected)
        cut = truncate(prompt, chosen, rejected, self.cfg, self.tokenizer.bos_token_id)
        if isinstance(cut[0], str):
            return BadRow(index, *cut)
        p, c, r = cut
        return TokenizedPair(index=index, uid=norm.uid, prompt_ids=tuple(p), chosen_ids=tuple(c), rejected_ids=tuple(r))

    def tokenize_range(self, source: RowSource, start: int, stop: int) -> RangeResult:
        """Tokenize rows ``[start, stop)``.  Under ``on_bad_row: fail`` the first bad row raises."""
        stop = min(stop, len(source))
        pairs, bad = [], []
        rows = source.dataset.select(range(start, stop)) if stop > start else []
        for offset, row in enumerate(rows):
            out = self.example(row, start + offset, source)
            if isinstance(out, BadRow):
                if self.cfg.on_bad_row == "fail":
                    raise BadRowError(
                        out.describe(source.where(out.index))
                        + " (set data.on_bad_row: skip to count and report bad rows instead)",
                        out,
                    )
                bad.append(out)
            else:
                pairs.append(out)
        return RangeResult(start, stop, pairs, bad)


def format_bad_report(bad: Iterable[BadRow], source: RowSource | None = None, limit: int = 20) -> str:
    """A short report: counts by reason, then the first ``limit`` rows with their location."""
    bad = list(bad)
    if not bad:
        return "bad rows: 0"
    counts = Counter(b.reason for b in bad)
    lines = [f"bad rows: {len(bad)} (" + ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) + ")"]
    for b in bad[:limit]:
        lines.append("  " + b.describe(source.where(b.index) if source else f"row {b.index}"))
    if len(bad) > limit:
        lines.append(f"  … and {len(bad) - limit} more")
    return "\n".join(lines)


def tokenizer_fingerprint(tokenizer) -> dict:
    """Hashes that identify a tokenizer and its chat template (for cache provenance)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab_blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": hashlib.sha256(vocab_blob.encode("utf-8")).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def file_sha256(paths: Iterable[str]) -> str:
    """Content hash of local data files (dataset provenance)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
