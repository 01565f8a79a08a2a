"""Where slots go: pure functions over slot counts and weights, no state, no time.

- `even_split`: the first assignment, contiguous ranges of (almost) equal size.
- `spread`: orphaned slots shared among drones in proportion to their free capacity, each
  drone getting contiguous runs, never all onto one drone.
- `rebalance`: which slots to take from over-full drones so every drone holds its fair share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from keyval.grants import NUM_SLOTS


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split `total` into integers proportional to `weights` (largest remainder method).

    Ties in the remainder go to names in sorted order, so the result is deterministic. With
    every weight zero the split is even."""
    names = sorted(weights)
    if not names:
        return {}
    weight_sum = sum(max(weights[name], 0.0) for name in names)
    if weight_sum <= 0:
        weight_sum = float(len(names))
        shares = {name: total / weight_sum for name in names}
    else:
        shares = {name: total * max(weights[name], 0.0) / weight_sum for name in names}
    result = {name: int(shares[name]) for name in names}
    leftover = total - sum(result.values())
    by_remainder = sorted(names, key=lambda name: (result[name] - shares[name], name))
    for name in by_remainder[:leftover]:
        result[name] += 1
    return result


def even_split(drones: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Contiguous (first, last) ranges covering all slots, one per drone, sizes differing by
    at most one, in sorted name order."""
    if not drones:
        return {}
    sizes = apportion(NUM_SLOTS, dict.fromkeys(drones, 1.0))
    result: dict[str, tuple[int, int]] = {}
    first = 0
    for name in sorted(drones):
        result[name] = (first, first + sizes[name] - 1)
        first += sizes[name]
    return result


def spread_quotas(
    orphans: int, slot_counts: Mapping[str, int], free_capacity: Mapping[str, float] | None
) -> dict[str, int]:
    """How many of `orphans` slots each drone takes.

    With a free capacity for every drone (keys it can still take), in proportion to it.
    Without (capacity unknown), fill to an even slot count: the drones holding the fewest
    slots take the most, as if capacity were measured in slots."""
    if not slot_counts:
        return {}
    if free_capacity is not None and sum(max(v, 0.0) for v in free_capacity.values()) > 0:
        return apportion(orphans, free_capacity)
    target = apportion(sum(slot_counts.values()) + orphans, dict.fromkeys(slot_counts, 1.0))
    deficits = {name: max(target[name] - slot_counts[name], 0) for name in slot_counts}
    return apportion(orphans, {name: float(d) for name, d in deficits.items()})


def spread(orphans: Sequence[int], quotas: Mapping[str, int]) -> dict[int, str]:
    """Deal sorted `orphans` out in contiguous runs, `quotas[name]` slots to each name."""
    result: dict[int, str] = {}
    position = 0
    ordered = sorted(orphans)
    for name in sorted(quotas):
        for slot in ordered[position : position + quotas[name]]:
            result[slot] = name
        position += quotas[name]
    if position != len(ordered):
        raise ValueError(f"quotas cover {position} slots, not {len(ordered)}")
    return result


def rebalance(slots_by_drone: Mapping[str, Sequence[int]]) -> dict[int, str]:
    """Moves (slot -> new owner) that bring every drone to its fair share of the slots held.

    Over-full drones give up their highest slots (their ranges stay contiguous at the low
    end); under-full drones take them in contiguous runs."""
    counts = {name: len(slots) for name, slots in slots_by_drone.items()}
    target = apportion(sum(counts.values()), dict.fromkeys(counts, 1.0))
    given_up: list[int] = []
    for name in sorted(counts):
        excess = counts[name] - target[name]
        if excess > 0:
            given_up.extend(sorted(slots_by_drone[name])[-excess:])
    deficits = {name: target[name] - counts[name] for name in counts if counts[name] < target[name]}
    return spread(given_up, deficits)
