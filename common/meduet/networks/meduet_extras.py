"""Options of MeDUET's training forward that the MeDUET paper does not have, in one place and off by default.

``MeduetExtras()`` is the paper: the content domain head sees the pooled content through gradient reversal, every
pair gets MFTD and SiQC, and there is no cross-appearance stream. The options:

* ``content_adversary``: ``"grl"`` (the paper) or ``"confusion"``: the head is trained on *detached* pooled
  content (``domain_content_logits``), and ``domain_content_confusion_logits`` are the same head with *frozen*
  parameters on the live content, for a loss pushing its prediction to uniform. With GRL the encoder can win by
  making the head confidently *wrong*, which keeps the site decodable; confusion has no such optimum.
  ``"confusion_tokens"``: the same with the head on every content token at its source's own positions (logits
  ``(2K, N, num_domains)``, valid where ``visible``).
* ``aux_pairs``: ``P`` (1..K, default K): only the first ``P`` pairs get the style-swapped streams and the
  re-encoded views (MFTD / SiQC on a subset of the pairs; the pairs are random, so any ``P`` of them are a random
  subset), which is most of a step's arithmetic.
* ``x_cross``: ``(2K, C, S1, S2, S3)`` copies of the batch with another appearance (same crops, e.g. meduet_vae's
  synthetic-site copies): each is encoded unmixed, and the decoder gets each source's content tokens from the
  mixed forward (its own positions) with the pooled style (mean part) of its copy: ``pred_cross (2K, N, C p^3)``,
  which should render the copy (the ``cross_appearance`` loss term).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ADVERSARIES", "MeduetExtras"]

ADVERSARIES = ("grl", "confusion", "confusion_tokens")


@dataclass(frozen=True)
class MeduetExtras:
    """Options not in the paper for one ``MeDUET.forward`` call (see the module docstring); defaults = the paper."""

    content_adversary: str = "grl"
    aux_pairs: int | None = None
    x_cross: torch.Tensor | None = None

    def pairs(self, k: int) -> int:
        """How many of the ``k`` pairs get MFTD and SiQC."""
        p = k if self.aux_pairs is None else int(self.aux_pairs)
        if not 1 <= p <= k:
            raise ValueError(f"aux_pairs must be in 1..{k} (the number of pairs), got {self.aux_pairs}")
        return p

    def content_domain_logits(self, model: Any, out: Mapping[str, torch.Tensor],
                              grl_lambda: float) -> dict[str, torch.Tensor]:
        """The content side of the domain game: the paper's gradient reversal, or a confusion adversary."""
        if self.content_adversary == "grl":
            return {"domain_content_logits": model.grl_domain_logits(out["content"], grl_lambda)}
        if self.content_adversary not in ADVERSARIES:
            raise ValueError(f"content_adversary must be one of {ADVERSARIES}, got {self.content_adversary!r}")
        head = model.domain_content_head
        if self.content_adversary == "confusion":
            live = out["content"]  # (2K, D)
        else:  # every content token must hide the site, not only their mean, which a fresh probe can still read
            live = out["content_tokens"].repeat(2, 1, 1)  # (2K, N, D); rows of A then B, valid where `visible`
        frozen = {n: p.detach() for n, p in head.named_parameters()}
        return {"domain_content_logits": head(live.detach()),
                "domain_content_confusion_logits": torch.func.functional_call(head, frozen, (live,))}

    def cross_appearance(self, model: Any, x: torch.Tensor, out: Mapping[str, torch.Tensor],
                         grid: Sequence[int]) -> dict[str, torch.Tensor]:
        """``pred_cross``: each source's own content tokens decoded with the pooled style of its appearance copy."""
        if self.x_cross is None:
            return {}
        if self.x_cross.shape != x.shape:
            raise ValueError(f"x_cross must have the batch's shape {tuple(x.shape)}, got {tuple(self.x_cross.shape)}")
        with torch.profiler.record_function("meduet/cross_appearance"):
            s_cross = model.backbone.encode(self.x_cross.to(x))["style"][:, None, : model.style_dim]  # (2K, 1, Ds)
            c_own = model.recombine.content_part(out["content_tokens"])  # (K, N, D): each position its own source's
            tokens_cross = torch.cat([c_own, c_own]) + model.recombine.style_part(s_cross)
            return {"pred_cross": model.decoder(tokens_cross, out["visible"], grid)}
