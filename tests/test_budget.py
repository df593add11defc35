import pytest

from budget import parse_duration


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400),
                                           ("0.001", 3.6), (" 2 min ", 120), ("1.5m", 90), (2, 7200)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "-1", "0", "0s", "inf", "nan", "-2m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
