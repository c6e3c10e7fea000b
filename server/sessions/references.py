"""Reference heads for the guards' shadow predictions, stacked so that one grouped head_forward
per round scores every guarded session's rows with its reference.

Row 0 is the backbone's base head; a session whose guard pins a version of itself gets a row
holding that version's W and b (copied from the guard, which keeps them). Rows grow by doubling
up to `max_rows`; when full, the least recently used row not needed by the current call is
reused.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

import kernels


class ReferencePool:
    def __init__(self, C: int, d: int, device, base_W: torch.Tensor, base_b: torch.Tensor, max_rows: int) -> None:
        self.C, self.d, self.device, self.max_rows = C, d, torch.device(device), max(2, max_rows)
        self.W = torch.zeros(2, C, d, device=self.device)
        self.b = torch.zeros(2, C, device=self.device)
        self.n_classes = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.normalize = torch.zeros(2, dtype=torch.bool, device=self.device)
        nb = base_W.shape[0]
        self.W[0, :nb], self.b[0, :nb], self.n_classes[0] = base_W.to(self.device), base_b.to(self.device), nb
        self.rows: OrderedDict[str, tuple[object, int]] = OrderedDict()  # owner -> (token, row)
        self.free = [1]

    def row(self, owner: str, token, ref: Optional[dict[str, torch.Tensor]], normalize: bool,
            busy: set[str]) -> int:
        """The row of `owner`'s reference (None: the base head, row 0). `token` names the
        reference's content (a new token refills the row); `busy`: owners the call needs."""
        if ref is None:
            return 0
        have = self.rows.get(owner)
        if have is not None and have[0] == token:
            self.rows.move_to_end(owner)
            return have[1]
        r = have[1] if have is not None else self._take(busy)
        n = ref["W"].shape[0]
        self.W[r].zero_()
        self.b[r].zero_()
        self.W[r, :n], self.b[r, :n] = ref["W"].to(self.device), ref["b"].to(self.device)
        self.n_classes[r], self.normalize[r] = n, normalize
        self.rows[owner] = (token, r)
        self.rows.move_to_end(owner)
        return r

    def drop(self, owner: str) -> None:
        have = self.rows.pop(owner, None)
        if have is not None:
            self.free.append(have[1])

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of each row's reference (rows -1: skipped)."""
        return kernels.head_forward(x, self.W, self.b, rows, self.n_classes, normalize=self.normalize)

    def _take(self, busy: set[str]) -> int:
        if not self.free:
            cap = self.W.shape[0]
            if cap < self.max_rows:
                new = min(2 * cap, self.max_rows)
                self.W = torch.cat([self.W, torch.zeros(new - cap, self.C, self.d, device=self.device)])
                self.b = torch.cat([self.b, torch.zeros(new - cap, self.C, device=self.device)])
                self.n_classes = torch.cat([self.n_classes, torch.zeros(new - cap, dtype=torch.int64,
                                                                        device=self.device)])
                self.normalize = torch.cat([self.normalize, torch.zeros(new - cap, dtype=torch.bool,
                                                                        device=self.device)])
                self.free.extend(range(new - 1, cap - 1, -1))
            else:
                victim = next(o for o in self.rows if o not in busy)
                self.free.append(self.rows.pop(victim)[1])
        return self.free.pop()
