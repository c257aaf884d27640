"""What the engine thread is asked to do: one typed shape per command.

The stdin reader and the preparer queue these for the engine, which applies
each by its name (`Engine._on_<name>`) between two decode steps. A sharded
worker's rank 0 sends every turn's commands to the other ranks in wire form,
a JSON list headed by the name: `wire()` writes it, `unwire()` reads it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from .protocol import RequestId

if TYPE_CHECKING:
    from .job import Job


@dataclass(frozen=True, slots=True)
class Command:
    name: ClassVar[str]

    def wire(self) -> list:
        return [self.name, *(getattr(self, f.name) for f in fields(self))]


@dataclass(frozen=True, slots=True)
class Generate(Command):
    """A prepared request to start."""

    name: ClassVar[str] = "generate"
    job: Job

    def wire(self) -> list:
        # The request travels as it came: every rank prepares its own job.
        return [self.name, self.job.request_id, self.job.source]


@dataclass(frozen=True, slots=True)
class Cancel(Command):
    """Stop the request `target`, then answer the cancel call `rpc_id`."""

    name: ClassVar[str] = "cancel"
    rpc_id: RequestId
    target: RequestId


@dataclass(frozen=True, slots=True)
class Load(Command):
    """Load the model `params` name, then answer `rpc_id`."""

    name: ClassVar[str] = "load"
    rpc_id: RequestId
    params: dict


@dataclass(frozen=True, slots=True)
class Shutdown(Command):
    """Fail what runs, answer `rpc_id`, and end the engine."""

    name: ClassVar[str] = "shutdown"
    rpc_id: RequestId


@dataclass(frozen=True, slots=True)
class Stop(Command):
    """End the engine without a word (stdin closed)."""

    name: ClassVar[str] = "stop"


# Every command but `generate`, whose wire form is a request still to prepare.
_PLAIN = {cls.name: cls for cls in (Cancel, Load, Shutdown, Stop)}


def unwire(data: list, prepare: Callable[[RequestId, dict], Job]) -> Command:
    """A command from its wire form; `prepare(request_id, params)` makes the
    job of a `generate`."""
    name, *args = data
    if name == Generate.name:
        return Generate(prepare(*args))
    return _PLAIN[name](*args)
