"""Token masks of the latent ViT: MeDUET's mix mask, the masked autoencoder's visible mask, and means over a mask.

Both masks are boolean ``(rows, N)`` with exactly ``round(ratio * N)`` True entries per row (half-up rounding), drawn
by ranking uniform noise, so any ``generator`` makes them reproducible.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sample_mix_mask", "sample_visible_mask", "masked_mean"]


def _count(ratio: float, n: int, what: str) -> int:
    count = int(math.floor(ratio * n + 0.5))
    if not 0 < count < n:
        raise ValueError(f"{what}={ratio} gives {count} of {n} tokens; it must leave at least one token on each side")
    return count


def _exactly_k_true(rows: int, n: int, k: int, device, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(rows, n, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < k


def sample_mix_mask(pairs: int, num_tokens: int, ratio: float = 0.5, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Random mix mask ``(pairs, num_tokens)`` bool with exactly ``round(ratio * N)`` True (= source A) per row."""
    return _exactly_k_true(pairs, num_tokens, _count(ratio, num_tokens, "mix_ratio"), device, generator)


def sample_visible_mask(batch: int, num_tokens: int, mask_ratio: float = 0.5, device=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """MAE mask ``(batch, N)`` bool, True = visible; exactly ``round(mask_ratio * N)`` hidden tokens per row."""
    hidden = _count(mask_ratio, num_tokens, "mask_ratio")
    return _exactly_k_true(batch, num_tokens, num_tokens - hidden, device, generator)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``tokens (B, N, F)`` over positions where ``mask (B, N)`` is True (all if None) -> ``(B, F)``."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
