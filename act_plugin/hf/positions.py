"""Token positions of a forward call, inferred from what the model's forward received.

A forward pre-hook on the model (and its inner ``PreTrainedModel``\\s) records the 2D
``attention_mask`` of each call (``generate`` passes it covering past and new tokens). A
token's position is ``cumsum(mask) - 1`` over the sequence's real tokens (``-1`` for
padding), so with left padding position 0 is the first *real* token, padding is never a key,
never a sink, and padding rows come out as zeros (no NaN). Without a 2D mask (``generate``
with a static cache hands the model a ready 4D mask) the call's ``position_ids`` locate the
first real token (left padding); without either, positions are ``arange(past + new)`` with
``past`` read from the cache. Queries are the last ``Lq`` token indices, keys the last ``Lk``
(sliding-window caches hand over only the window's tail); when a static cache hands over more
key slots than tokens seen, the unused trailing slots are padding. An attention module called
outside a model forward gets ``arange`` positions.
"""

from __future__ import annotations

from typing import Any

import torch


class CallPositions:
    """What the forward pre-hooks saw of the current (outermost) forward call, and the
    ``q_pos``/``k_pos`` an attention layer of that call derives from it."""

    def __init__(self) -> None:
        self.calls = 0  # outermost forward calls seen
        self.depth = 0  # nesting of hooked forwards (an outer model calling its inner one)
        self._mask2d: torch.Tensor | None = None
        self._past_len: int | None = None
        self._new_len: int | None = None
        self._pos_ids: torch.Tensor | None = None
        self._pos_cache: torch.Tensor | None = None

    def enter(self, got: dict[str, Any]) -> None:
        """A hooked forward starts with the arguments ``got`` (positional ones by name)."""
        if self.depth == 0:
            self.calls += 1
            self._mask2d = None
            self._past_len = None
            self._new_len = None
            self._pos_ids = None
            self._pos_cache = None
        self.depth += 1
        mask = got.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._mask2d = mask
            self._pos_cache = None
        pid = got.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.dim() == 2:
            self._pos_ids = pid
        past = got.get("past_key_values")
        if past is not None and hasattr(past, "get_seq_length"):
            try:
                self._past_len = int(past.get_seq_length())
            except Exception:  # pragma: no cover - exotic caches
                pass
        for name in ("input_ids", "inputs_embeds"):
            x = got.get(name)
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                self._new_len = int(x.shape[1])
                break

    def leave(self) -> None:
        """A hooked forward ended (normally or not)."""
        self.depth = max(0, self.depth - 1)

    def forget(self) -> None:
        """Drop the tensors held for the current call (the handle is being removed)."""
        self._mask2d = self._pos_cache = None

    def positions(self, B: int, Lq: int, Lk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_pos [B, Lq]``, ``k_pos [B, Lk]``: position in the sequence's real tokens, -1 = padding."""
        pos = self._pos_cache if self.depth > 0 else None
        if self.depth > 0 and (pos is None or pos.device != device):
            pos = self._call_positions(device)
            self._pos_cache = pos
        if pos is None or pos.shape[1] < Lq:
            pos = torch.arange(max(Lk, Lq), device=device).unsqueeze(0)
        if pos.shape[0] != B:
            if pos.shape[0] != 1:
                raise RuntimeError(
                    f"ACT: the 2D attention_mask has batch {pos.shape[0]} but the attention layer sees batch {B}"
                )
            pos = pos.expand(B, -1)
        T = pos.shape[1]
        q_pos = pos[:, T - Lq:]
        if Lk <= T:
            k_pos = pos[:, T - Lk:]
        else:  # static cache: key slots beyond the tokens seen so far are empty
            k_pos = torch.cat([pos, torch.full((B, Lk - T), -1, dtype=pos.dtype, device=device)], dim=1)
        return q_pos, k_pos

    def _call_positions(self, device: torch.device) -> torch.Tensor | None:
        """``[B or 1, T]`` position of each token index of this call's sequences (past + new)."""
        if self._mask2d is not None:
            m = self._mask2d.to(device=device) != 0
            return torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(m, -1, dtype=torch.long))
        if self._new_len is None:
            return None
        total = (self._past_len or 0) + self._new_len
        idx = torch.arange(total, device=device).unsqueeze(0)
        pid = self._pos_ids
        if pid is not None and pid.shape[1] == self._new_len:
            # No 2D mask (e.g. generate() with a static cache hands the model a ready 4D mask):
            # the last token of the call is real and tokens are contiguous after the left
            # padding, so the first real token sits at index (total - 1) - position_ids[:, -1].
            first = (total - 1) - pid[:, -1:].to(device=device, dtype=torch.long)
            pos = idx - first
            return pos.masked_fill(pos < 0, -1)
        return idx


def mask_visibility(mask: Any, B: int, Lq: int, Lk: int) -> torch.Tensor | None:
    """Boolean ``[B, Lq, Lk]`` (True = may attend) from the 4D mask transformers passed."""
    if not isinstance(mask, torch.Tensor):
        return None  # None: plain causal (sdpa's is_causal skip); positions encode it
    if mask.dim() == 4:
        m = mask[:, 0]
    elif mask.dim() == 3:
        m = mask
    elif mask.dim() == 2 and mask.shape == (Lq, Lk):
        m = mask.unsqueeze(0)
    else:
        raise RuntimeError(f"ACT: unexpected attention mask of shape {tuple(mask.shape)}")
    if m.shape[-1] > Lk:
        m = m[..., :Lk]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    return m.expand(B, Lq, Lk)
