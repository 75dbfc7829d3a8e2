"""A KV cache for a batch of rows of different lengths that join and leave between steps.

Rows are right-aligned: every row's newest token sits in the same column, so one step writes one
column for the decoding rows, and shorter rows are padded on the left (masked out). A request
joins inside a step: its prompt's keys and values are written in that step's forward, ending in
the step's column, so it decodes from the next step on like any other row. A finished row leaves
at once, and the columns that were only padding go with it. Buffers grow by doubling, so a step
copies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Joining:
    """A row that joins in this step: `new` prompt positions computed now, after `reused` ones
    whose keys and values came from the prefix cache."""
    start: int  # where its new positions begin in the step's packed tokens
    new: int
    reused: int

    @property
    def length(self) -> int:
        return self.reused + self.new


@dataclass
class StepLayout:
    """How one step's packed tokens map onto the cache's rows: first one token for each of the
    first `decoding` rows, then each joining row's new prompt positions, in order; joining row j
    is cache row `decoding + j`."""
    decoding: int
    joining: list[Joining] = field(default_factory=list)


class _RowsLayer(DynamicLayer):
    """One layer's buffers (row capacity, heads, column capacity, head_dim); `update` writes the
    step's keys and values where the owner's layout puts them and returns every row in use up to
    the step's column."""

    def __init__(self, owner: RowCache):
        super().__init__()
        self.owner = owner
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: (1, heads, step tokens, head_dim), packed as the layout says."""
        column, layout = self.owner.length, self.owner.layout
        rows = layout.decoding
        for buf, states in ((self.k_buf, key_states), (self.v_buf, value_states)):
            buf[:rows, :, column] = states[0, :, :rows].transpose(0, 1)
            for index, joining in enumerate(layout.joining, start=rows):
                new = states[0, :, joining.start:joining.start + joining.new]
                buf[index, :, column + 1 - joining.new:column + 1] = new
        in_use = self.owner.rows
        self.keys, self.values = self.k_buf[:in_use, :, :column + 1], self.v_buf[:in_use, :, :column + 1]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.length


class RowCache(Cache):
    """The decode batch's KV cache and padding mask: `rows` rows in use, `length` columns filled
    for each; a step writes column `length`. Rows and columns both grow by doubling, and a row
    that leaves is filled by moving the last one in, so neither a join nor a leave copies the batch."""

    def __init__(self, num_layers: int, key_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[_RowsLayer(self) for _ in range(num_layers)])
        self.rows = 0
        self.length = 0
        self.layout = StepLayout(0)
        self.valid = torch.zeros(8, 64, dtype=torch.bool, device=device)  # not padding
        for layer in self.layers:
            layer.k_buf = torch.zeros(8, key_heads, 64, head_dim, dtype=dtype, device=device)
            layer.v_buf = torch.zeros(8, key_heads, 64, head_dim, dtype=dtype, device=device)

    def begin_step(self, joining: list[Joining], reused_layers: list[list | None]) -> StepLayout:
        """Lay out the next step: the rows in use decode one token each, and the joining rows are
        added after them, each ending in the step's column. A joining row's reused keys and values
        (per layer (1, heads, reused, head_dim), or None) are written now; the forward writes the rest."""
        # a joining row longer than the others so far pads every other row further on the left
        shift = max(0, max((j.length for j in joining), default=0) - self.length - 1)
        columns, rows = self.length + shift + 1, self.rows + len(joining)
        have_rows, have_columns = self.valid.shape
        if shift or columns > have_columns or rows > have_rows:
            self._resize(have_columns if columns <= have_columns else 2 * columns,
                         have_rows if rows <= have_rows else 2 * rows, offset=shift)
            self.length += shift
        self.valid[:self.rows, self.length] = True  # the decoding rows' step column
        end = self.length + 1
        for index, (j, reused) in enumerate(zip(joining, reused_layers, strict=True), start=self.rows):
            self.valid[index] = False
            self.valid[index, end - j.length:end] = True
            for number, layer in enumerate(self.layers):
                for buf, part in ((layer.k_buf, 0), (layer.v_buf, 1)):
                    buf[index].zero_()  # what a former row left there, so that padding holds no stale values
                    if reused is not None:
                        buf[index, :, end - j.length:end - j.new] = reused[number][part][0]
        self.layout = StepLayout(self.rows, joining)
        self.rows += len(joining)
        return self.layout

    def step_mask(self) -> torch.Tensor:
        """The decoding rows' attention mask for the step (rows, 1, 1, length + 1): additive, 0 where
        a row attends and -inf on its padding, in the cache's dtype (SDPA on a CPU turns a boolean
        mask into that in every layer). Joining rows need none: their keys are the last columns."""
        valid = self.valid[:self.layout.decoding, :self.length + 1]
        mask = torch.zeros(valid.shape, dtype=self.layers[0].k_buf.dtype, device=valid.device)
        return mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]

    def advance(self) -> None:
        self.length += 1

    def keep(self, order: list[int]) -> None:
        """Keep these rows (at least one): row i becomes former row order[i]. Only the rows that
        move are copied. Then the columns that are padding in every row are dropped."""
        moved = [i for i, source in enumerate(order) if source != i]
        if moved:
            targets = torch.tensor(moved, device=self.valid.device)
            sources = torch.tensor([order[i] for i in moved], device=self.valid.device)
            self.valid[targets] = self.valid[sources]
            for layer in self.layers:
                layer.k_buf[targets] = layer.k_buf[sources]
                layer.v_buf[targets] = layer.v_buf[sources]
        self.rows = len(order)
        drop = int(self.valid[:self.rows, :self.length].any(dim=0).int().argmax())
        if drop:
            self.valid = self.valid[:, drop:]
            for layer in self.layers:
                layer.k_buf, layer.v_buf = layer.k_buf[:, :, drop:], layer.v_buf[:, :, drop:]
            self.length -= drop

    def _resize(self, columns: int, rows: int, *, offset: int) -> None:
        """New buffers of `rows` x `columns` with the filled part moved `offset` columns to the right."""
        old, new, used = slice(0, self.length), slice(offset, offset + self.length), slice(0, self.rows)
        valid = torch.zeros(rows, columns, dtype=torch.bool, device=self.valid.device)
        valid[used, new] = self.valid[used, old]
        self.valid = valid
        for layer in self.layers:
            for name in ("k_buf", "v_buf"):
                buf = getattr(layer, name)
                grown = buf.new_zeros(rows, buf.shape[1], columns, buf.shape[3])
                grown[used, :, new] = buf[used, :, old]
                setattr(layer, name, grown)
