"""Right-padded batches of calibration prompts for the transformers search path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from act_plugin.search.scoring import CalibrationSet, sample_weights

__all__ = ["Batch", "make_batches"]


@dataclass(frozen=True)
class Batch:
    index: int
    samples: tuple[int, ...]  # indices into the calibration set
    ids: torch.Tensor  # [B, L] right-padded
    pos: torch.Tensor  # [B, L], -1 on padding
    last: torch.Tensor  # [B] index of each prompt's last token
    choice_ids: torch.Tensor  # [B, Cmax]
    valid: torch.Tensor  # [B, Cmax]
    gold: torch.Tensor  # [B]
    weights: torch.Tensor  # [B] macro-average weight of each sample (float64)

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


def make_batches(calib: CalibrationSet, batch_tokens: int, pad_id: int = 0) -> list[Batch]:
    """Prompts sorted by length (stable), packed while ``count x longest <= batch_tokens``."""
    order = sorted(range(len(calib)), key=lambda i: (len(calib.prompts[i]), i))
    groups: list[list[int]] = []
    for i in order:
        n = len(calib.prompts[i])
        if groups and (len(groups[-1]) + 1) * n <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    ids_all, valid_all = calib.choice_matrix()
    w_all = sample_weights(calib.tasks)
    batches = []
    for b, g in enumerate(groups):
        L = max(len(calib.prompts[i]) for i in g)
        ids = torch.full((len(g), L), pad_id, dtype=torch.long)
        pos = torch.full((len(g), L), -1, dtype=torch.long)
        for r, i in enumerate(g):
            p = calib.prompts[i]
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            pos[r, : len(p)] = torch.arange(len(p))
        batches.append(Batch(
            index=b, samples=tuple(g), ids=ids, pos=pos,
            last=torch.tensor([len(calib.prompts[i]) - 1 for i in g], dtype=torch.long),
            choice_ids=torch.from_numpy(ids_all[g]), valid=torch.from_numpy(valid_all[g]),
            gold=torch.tensor([calib.gold[i] for i in g], dtype=torch.long),
            weights=torch.from_numpy(w_all[g])))
    return batches
