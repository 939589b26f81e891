"""Generative (instruction) data: the embedded referral-letter task, and loaders for the layouts
people already use, Alpaca's ``instruction``/``input``/``output`` rows (MedAlpaca's flashcards
too) in JSONL or CSV, and chat ``messages`` rows (role/content) in JSONL.

A prompt travels as a JSON list of chat messages, rendered through the tokenizer's chat template
by ``fedpeft.tasks.causal_lm``; the response is the text the loss is computed on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fedpeft.data.loaders import DataLoadError, _read_text, jsonl_objects
from fedpeft.data.notes import LABELS, SiteStyle, notes_with_findings

SYSTEM = "Triage the referral: the specialty, then the key finding."
QUESTION = "Specialty?"
ROLES = ("system", "user", "assistant")


def chat(user: str, system: str | None = None) -> str:
    """A prompt: the chat messages before the answer, as JSON."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return json.dumps(msgs, ensure_ascii=False)


def referral_response(label: int, finding: str) -> str:
    """The target: the specialty, then the reason in one line ("Cardiology: syncope.")."""
    return f"{LABELS[label].capitalize()}: {finding}."


def generate_referrals(
    *, n: int, seed: int, style: SiteStyle | None = None, mix: np.ndarray | None = None, label_noise: float = 0.0,
) -> tuple[list[str], list[int], list[str]]:
    """(prompts, specialties, responses): the notes generator's referral notes (same non-IID styles
    and class mixes), each asked for its specialty and reason. Flipped labels flip the answer."""
    notes, labels, findings = notes_with_findings(n=n, seed=seed, style=style, mix=mix, label_noise=label_noise)
    prompts = [chat(f"Referral note: {note}\n{QUESTION}", SYSTEM) for note in notes]
    return prompts, labels, [referral_response(y, f) for y, f in zip(labels, findings)]


def _alpaca(where: str, path: Path, row: dict) -> tuple[str, str]:
    for key in ("instruction", "output"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataLoadError(f"{path}: {where}: field {key!r} is {'missing' if value is None else 'empty'}")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataLoadError(f"{path}: {where}: field 'input' must be text, got {type(extra).__name__}")
    user = row["instruction"].strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    return chat(user), row["output"].strip()


def _messages(where: str, path: Path, msgs: object) -> tuple[str, str]:
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataLoadError(f"{path}: {where}: field 'messages' must be a list of at least 2 messages")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataLoadError(f"{path}: {where}: field 'messages[{j}]' must be {{role: {'|'.join(ROLES)}, "
                                f"content: text}}, got {m!r}"[:300])
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataLoadError(f"{path}: {where}: field 'messages': the last message must be the assistant's answer")
    return json.dumps(msgs[:-1], ensure_ascii=False), msgs[-1]["content"].strip()


def _rows(path: Path, text: str) -> Iterable[tuple[str, dict]]:
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        for col in ("instruction", "output"):
            if col not in header:
                raise DataLoadError(f"{path}: header: missing column {col!r} (columns: {header})")
        for row in reader:
            yield f"row {reader.line_num}", dict(row)
        return
    for i, obj in jsonl_objects(path, text):
        yield f"line {i}", obj


def load_instructions(path: str | Path) -> tuple[list[str], list[str]]:
    """(prompts, responses) from a JSONL/CSV file of Alpaca rows or (JSONL) chat ``messages`` rows."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise DataLoadError(f"{path}: unsupported file type {path.suffix!r} for causal-lm (use .jsonl or .csv)")
    prompts: list[str] = []
    responses: list[str] = []
    for where, row in _rows(path, _read_text(path)):
        p, r = _messages(where, path, row["messages"]) if "messages" in row else _alpaca(where, path, row)
        prompts.append(p)
        responses.append(r)
    if not prompts:
        raise DataLoadError(f"{path}: no data rows")
    return prompts, responses
