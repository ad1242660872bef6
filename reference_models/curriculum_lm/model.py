"""Seed 002 model: the character vocabulary, the tiny char LM, its loss and greedy generation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# ------------------------------------------------------------------ model
VOCAB = "\0\n" + "".join(chr(c) for c in range(32, 127))  # pad, end, printable ASCII
STOI = {c: i for i, c in enumerate(VOCAB)}


def encode(texts: Sequence[str]) -> torch.Tensor:
    """(B, T+1) int64: each text + "\\n", right-padded with 0."""
    width = max(len(t) for t in texts) + 1
    out = torch.zeros(len(texts), width, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [STOI[c] for c in t + "\n"]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class CharLM(nn.Module):
    def __init__(self, d_model: int = 32):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)
        self.head = nn.Linear(d_model, len(VOCAB))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        h, _ = self.rnn(self.embed(tokens))  # (B, T, D)
        return self.head(h)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # (B, T, V)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       tokens[:, 1:].reshape(-1), ignore_index=0)


@torch.no_grad()
def generate(model: nn.Module, prompt: str, max_new: int = 12) -> str:
    """Greedy decoding up to "\\n" — the seed's ``::::::`` collapse shows up here."""
    ids = [STOI[c] for c in prompt]
    out = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt in (0, 1):
            break
        ids.append(nxt)
        out.append(VOCAB[nxt])
    return "".join(out)
