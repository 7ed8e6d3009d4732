"""How ``tq tasks`` / ``tq show`` put records into words."""

from __future__ import annotations

import pytest

from celery_tq.monitoring.record_text import duration, error_line, parse_state, short_ids, traceback_chain


@pytest.mark.parametrize(
    ("word", "state"),
    [("FAILED", "FAILURE"), ("failed", "FAILURE"), ("Failure", "FAILURE"), ("succeeded", "SUCCESS"),
     ("pending", "QUEUED"), ("retried", "RETRY"), ("cancelled", "REVOKED"), ("started", "STARTED")],
)  # fmt: skip
def test_flowers_and_celerys_state_words_in_any_case_name_the_registrys_states(word: str, state: str) -> None:
    assert parse_state(word) == state


def test_an_unknown_state_word_lists_the_states() -> None:
    with pytest.raises(ValueError, match="one of QUEUED, STARTED"):
        parse_state("exploded")


def test_short_ids_are_unique_prefixes_of_at_least_eight_characters() -> None:
    ids = ["abcdef0123-1", "abcdef0199-2", "12345678-x"]
    assert short_ids(ids) == dict(zip(ids, ["abcdef012", "abcdef019", "12345678"], strict=True))


@pytest.mark.parametrize(("seconds", "text"), [(0.00477, "4.8 ms"), (1.25, "1.25 s"), (125.2, "2 min 5 s")])
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_error_line_names_the_type_once() -> None:
    line = "IoError: I/O error: gone"
    assert error_line({"type": "IoError", "message": line}) == line
    assert error_line({"type": "KeyError", "message": ""}) == "KeyError"


def test_traceback_chain_prints_the_first_cause_first() -> None:
    error = {
        "type": "IoError",
        "traceback": "Traceback: outer\nIoError: x\n",
        "cause": {"type": "OSError", "message": "OSError: y", "traceback": None, "cause": None},
    }
    text = traceback_chain(error)
    assert text.index("OSError: y") < text.index("direct cause") < text.index("Traceback: outer")
