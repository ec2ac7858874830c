"""The contract's machine-readable parts stay in step with the code."""
from __future__ import annotations

import msgspec
import pytest

from schemas import events as ev
from schemas import generate


def test_committed_json_schemas_match_the_code():
    assert generate.drift() == [], "run: python -m schemas.generate"


def test_every_contract_event_type_has_a_schema():
    names = {t.__name__ for t in ev.EVENT_TYPES}
    assert {"CitySet", "BudgetSet", "ProviderSet", "VoucherMinted", "VoucherRevoked", "VoucherExpired",
            "VoucherRedeemed", "HoldPlaced", "HoldCaptured", "HoldVoided", "RedemptionRefunded"} <= names
    for name in names:
        assert (generate.OUT_DIR / f"{name}.schema.json").exists()


def test_events_round_trip_through_the_envelope():
    data = ev.CitySetData(city="wuxi", name="无锡", currency="CNY")
    event = ev.CitySet(event_id="0b6f6c1e-3f6a-4c8e-9a51-2f1d2c3b4a59", occurred_at="2026-01-01T00:00:00Z",
                       producer="issuing", actor="admin", data=data)
    raw = msgspec.json.encode(event)
    assert msgspec.json.decode(raw)["type"] == "CitySet"
    assert ev.decode_event(raw) == msgspec.convert(msgspec.json.decode(raw), ev.Event)


def test_a_negative_amount_in_an_event_is_refused_by_the_decoder():
    raw = (b'{"type":"HoldCaptured","event_id":"0b6f6c1e-3f6a-4c8e-9a51-2f1d2c3b4a59",'
           b'"occurred_at":"2026-01-01T00:00:00Z","producer":"redemption","actor":"provider:p","data":{'
           b'"hold_id":"0b6f6c1e-3f6a-4c8e-9a51-2f1d2c3b4a58","voucher_id":"0b6f6c1e-3f6a-4c8e-9a51-2f1d2c3b4a57",'
           b'"city":"wuxi","year":2026,"provider":"p","captured":-5,"released":0}}')
    with pytest.raises(msgspec.ValidationError, match="captured"):
        ev.decode_event(raw)
