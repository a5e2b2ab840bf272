"""Sequence packing: whole examples into rows of a fixed capacity, first-fit decreasing."""

from __future__ import annotations

from collections.abc import Sequence


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each holding at most ``capacity`` tokens: examples longest first, each into the first
    row (in the order rows were opened) that has room, else into a new row. A max tree over the rows' free space
    finds that row in O(log rows)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # free[size + r]: room left in row r; inner nodes: the most room below them
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row holds ({capacity})")
        if free[1] >= n:
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= n else 2 * node + 1
            r = node - size
        else:
            r = len(rows)
            rows.append([])
            free[size + r] = capacity
        rows[r].append(i)
        node = size + r
        free[node] -= n
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows
