"""One pre-LayerNorm Transformer block used by SASRec (causal) and BERT4Rec (bidirectional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransformerBlock", "TransformerEncoder"]


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, ffn_mult: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn_mult * hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_mult * hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, L, H]; ``allowed`` bool [B, 1, L, L] (True = query may attend to key)."""
        b, length, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                  dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(b, length, hidden)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class TransformerEncoder(nn.Module):
    """Positional embeddings + blocks + final LayerNorm over already-embedded items."""

    def __init__(self, hidden: int, heads: int, blocks: int, positions: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.position = nn.Embedding(positions, hidden)
        nn.init.normal_(self.position.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """embedded [B, L, H] right-padded items, lengths [B] -> states [B, L, H]."""
        b, length, _ = embedded.shape
        positions = torch.arange(length, device=embedded.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)                       # [B, L]
        x = self.input_dropout(embedded + self.position(positions)) * real.unsqueeze(-1)
        if self.causal:
            # Right padding: a real position only sees earlier positions, which are all real.
            allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            allowed = allowed.view(1, 1, length, length).expand(b, 1, length, length)
        else:
            # Every query sees every real key; position 0 is always real, so no row is empty.
            allowed = real.view(b, 1, 1, length).expand(b, 1, length, length)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x)
