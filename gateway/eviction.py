"""Which loaded models make room for another: the eviction policy, pure.

No I/O, no clocks, no asyncio: the registry describes what is resident and
asks `plan` what to do, so the rules can be tested on their own.

The rules:
  * a model larger than the whole budget never fits (the caller says so: 400);
  * pinned models are never evicted, so what they hold is never available;
  * busy models (requests in flight or queued) are never evicted;
  * among the idle, unpinned, loaded models the least recently used go first,
    and only as many as needed; if evicting every candidate would still not
    make room, nothing is evicted and the caller waits for a model to become
    idle (evicting half of what is needed would only thrash).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MB = 1024 * 1024


@dataclass(frozen=True)
class Resident:
    """A model that holds (or has reserved) memory."""

    name: str
    bytes: int  # what it holds or is expected to hold, all its workers together
    last_used: float  # any monotonic clock; smaller is older
    busy: bool = False  # requests in flight or queued
    pinned: bool = False  # never evicted to make room
    evictable: bool = True  # False while loading or unloading


@dataclass(frozen=True)
class Plan:
    """What to do about a model that needs `need` bytes and a place in the count."""

    fits: bool
    evict: tuple[str, ...] = ()  # the models to unload first, oldest first
    never: str | None = None  # why it can never fit while things stay as they are
    waiting_for: str = ""  # why it does not fit now (it may after a model goes idle)
    reasons: dict[str, str] = field(default_factory=dict)  # evicted name -> which limit


def _mb(n: int) -> str:
    mb = n / MB
    if mb >= 100:
        return f"{mb:.0f} MB"
    text = f"{mb:.1f}" if mb >= 1 else f"{mb:.2f}"
    return text.removesuffix(".0").removesuffix(".00") + " MB"


def _why_kept(r: Resident) -> str:
    if r.pinned:
        return "pinned"
    return "busy" if r.busy else "loading or unloading"


def plan(
    name: str,
    need: int,
    residents: list[Resident],
    *,
    budget: int | None,
    max_models: int | None,
) -> Plan:
    """Room for model `name` (needing `need` bytes) among `residents`."""
    if budget is not None and need > budget:
        return Plan(
            False,
            never=f"model {name} needs about {_mb(need)}, more than the whole memory "
            f"budget of {_mb(budget)}",
        )
    pinned = [r for r in residents if r.pinned]
    pinned_bytes = sum(r.bytes for r in pinned)
    if budget is not None and pinned_bytes + need > budget:
        return Plan(
            False,
            never=f"model {name} needs about {_mb(need)}; the memory budget is {_mb(budget)} "
            f"and pinned models hold {_mb(pinned_bytes)} "
            f"({', '.join(r.name for r in pinned)})",
        )
    if max_models is not None and len(pinned) >= max_models:
        return Plan(
            False,
            never=f"{len(pinned)} pinned models already fill --max-loaded-models {max_models}",
        )
    used = sum(r.bytes for r in residents)
    count = len(residents)
    candidates = sorted(
        (r for r in residents if r.evictable and not r.busy and not r.pinned),
        key=lambda r: r.last_used,
    )
    evict: list[str] = []
    reasons: dict[str, str] = {}
    for victim in candidates:
        over_budget = budget is not None and used + need > budget
        over_count = max_models is not None and count + 1 > max_models
        if not (over_budget or over_count):
            break
        evict.append(victim.name)
        reasons[victim.name] = "memory_budget" if over_budget else "max_loaded_models"
        used -= victim.bytes
        count -= 1
    over_budget = budget is not None and used + need > budget
    over_count = max_models is not None and count + 1 > max_models
    if over_budget or over_count:
        busy = [r for r in residents if r.busy or r.pinned or not r.evictable]
        held = ", ".join(f"{r.name} ({_mb(r.bytes)}, {_why_kept(r)})" for r in busy) or "none"
        if over_budget:
            why = (
                f"model {name} needs about {_mb(need)}; the memory budget is {_mb(budget)} "
                f"and busy, pinned or loading models hold {_mb(used)}: {held}"
            )
        else:
            why = (
                f"--max-loaded-models is {max_models} and every loaded model is busy, "
                f"pinned or loading: {held}"
            )
        return Plan(False, waiting_for=why)
    return Plan(True, evict=tuple(evict), reasons=reasons)
