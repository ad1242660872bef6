"""Owns HF Trainer's ``trainer_state.json``: its ``log_history`` list, one record per
entry (training entries carry ``loss``/``grad_norm``/``learning_rate``, evaluation
entries ``eval_*``, each with ``step`` and ``epoch``).  The closing summary entry
(``train_runtime``, ``train_loss`` averaged over the run) is not a logged step and
is skipped.  Errors name the entry: ``trainer_state.json:log_history[12]: problem``.
"""
from __future__ import annotations

import json

from invariants.signatures.readers.columns import Builder, block_from_records
from invariants.signatures.readers.stream import Source, err

MAX_STATE_BYTES = 512 << 20
SUMMARY_KEYS = ("train_runtime", "total_flos")


def looks_like_state(head: bytes) -> bool:
    return head.lstrip().startswith(b"{") and b'"log_history"' in head


def read_trainer_state(src: Source, b: Builder) -> None:
    raw = src.read_all(MAX_STATE_BYTES)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise err(src.path, None, f"not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    hist = doc.get("log_history") if isinstance(doc, dict) else None
    if not isinstance(hist, list):
        raise err(src.path, None, "no 'log_history' list (expected HF Trainer's "
                                  "trainer_state.json)")
    records = []
    for i, rec in enumerate(hist):
        where = f"log_history[{i}]"
        if not isinstance(rec, dict):
            raise err(src.path, where, f"expected an object, got {type(rec).__name__}")
        if any(k in rec for k in SUMMARY_KEYS):
            continue
        records.append((where, rec))
    if not records:
        raise err(src.path, None, "empty log: 'log_history' has no logged step")
    if b.step_key is None:
        b.choose_step_key(records[0][1].keys(), records[0][0], records[0][1])
    b.add(block_from_records(b, records))
