"""services.common.ids: version 7 ids carry their millisecond and sort by it; version 4 ids stay fully random."""
from __future__ import annotations

import time
import uuid

from services.common.ids import uuid4s, uuid7, uuid7s


def test_version_7_ids_carry_their_millisecond_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = uuid7s(1000)
    time.sleep(0.002)
    later = uuid7()
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in first]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert [str(u) for u in parsed] == first  # canonical text, as str(uuid.UUID) writes it
    assert len(set(first)) == 1000
    stamps = {u.int >> 80 for u in parsed}
    assert len(stamps) == 1 and before <= stamps.pop() <= after
    assert all(i < later for i in first)  # text order is time order across milliseconds
    # 74 random bits: the bits after the timestamp differ within a millisecond.
    assert len({u.int & ((1 << 80) - 1) for u in parsed}) == 1000


def test_version_4_ids_are_random() -> None:
    ids = [uuid.UUID(i) for i in uuid4s(1000)]
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in ids)
    assert len({u.int >> 80 for u in ids}) > 990
