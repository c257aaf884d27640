"""The Responses API's store: recent responses kept in memory, bounded by
count and bytes, so `previous_response_id` can continue a conversation and
GET /v1/responses/{id} can return one. The oldest go first; nothing outlives
the process.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Stored:
    response: dict  # the response object, as GET returns it
    history: list[dict]  # the conversation so far as worker messages, without instructions
    size: int  # bytes, as counted against the bound


class ResponseStore:
    def __init__(self, *, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, history: list[dict]) -> bool:
        """Keep a response; False when it alone is over the bound (or the
        store is off)."""
        size = len(orjson.dumps(response)) + len(orjson.dumps(history))
        if self.max_entries <= 0 or size > self.max_bytes:
            return False
        self.delete(response["id"])
        self._entries[response["id"]] = Stored(response, history, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self.bytes -= oldest.size
        return True

    def get(self, response_id: str) -> Stored | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        stored = self._entries.pop(response_id, None)
        if stored is None:
            return False
        self.bytes -= stored.size
        return True
