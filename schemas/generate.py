"""Write the JSON Schema of every event (and of the whole union) into schemas/json/.

    python -m schemas.generate           # rewrite the files
    python -m schemas.generate --check   # exit 1 when the committed files differ from the code
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Final

import msgspec

from .events import EVENT_TYPES, Event

OUT_DIR: Final = Path(__file__).parent / "json"


def documents() -> dict[str, str]:
    docs = {}
    for event_type in EVENT_TYPES:
        schema = msgspec.json.schema(event_type)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = event_type.__name__
        docs[f"{event_type.__name__}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    union = msgspec.json.schema(Event)
    union["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    union["title"] = "Event"
    docs["Event.schema.json"] = json.dumps(union, indent=2, sort_keys=True) + "\n"
    return docs


def drift() -> list[str]:
    """Names of files that are missing, different, or no longer generated."""
    docs = documents()
    present = {p.name for p in OUT_DIR.glob("*.schema.json")}
    changed = [name for name, text in docs.items()
               if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_text() != text]
    return sorted(changed + sorted(present - docs.keys()))


def main() -> int:
    if "--check" in sys.argv:
        bad = drift()
        for name in bad:
            print(f"schemas/json/{name} differs from the code; run python -m schemas.generate", file=sys.stderr)
        return 1 if bad else 0
    OUT_DIR.mkdir(exist_ok=True)
    for stale in OUT_DIR.glob("*.schema.json"):
        stale.unlink()
    for name, text in documents().items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(documents())} schemas to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
