"""How a flat buffer is cut into one equal, contiguous slice per rank."""

from __future__ import annotations

from typing import NamedTuple

from gpuadam.flat import ALIGN


class ShardLayout(NamedTuple):
    """``ranks`` slices of ``length`` elements each over a buffer of ``size`` elements: rank ``r``
    owns ``[r * length, (r + 1) * length)``, cut at ``size``. ``length`` is a multiple of ``ALIGN``
    (every slice starts as aligned as the buffer), so the last ranks' slices may be short or empty;
    each rank still keeps ``length`` elements of state (the padding is zero, as a FlatBuffer's)."""

    size: int
    ranks: int
    length: int

    @classmethod
    def of(cls, size: int, ranks: int) -> ShardLayout:
        if ranks < 1:
            raise ValueError(f"ranks: expected at least 1, got {ranks}")
        per_rank = -(-size // ranks)
        return cls(size, ranks, max(ALIGN, -(-per_rank // ALIGN) * ALIGN))

    def bounds(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` of the elements of the buffer that ``rank`` owns (``stop - start`` may
        be less than ``length``, or 0)."""
        start = min(rank * self.length, self.size)
        return start, min(start + self.length, self.size)

    def counts(self) -> list[int]:
        """Elements of the buffer each rank owns."""
        return [stop - start for start, stop in map(self.bounds, range(self.ranks))]

    @property
    def full_chunks(self) -> int:
        """How many ranks own a whole ``length`` of the buffer (the others own its tail, or nothing)."""
        return self.size // self.length

    @property
    def even(self) -> bool:
        """Whether the buffer is exactly ``ranks * length`` long: one equal chunk per rank."""
        return self.size == self.ranks * self.length
