"""Task metadata: the Priority scale, validation, merging, and where bad values are refused."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, _state

import celery_tq
from celery_tq import Priority, TaskMetadata, TqTask
from celery_tq.errors import MetadataError, TaskError
from celery_tq.metadata import CALL_METADATA, carried, stamp


@pytest.fixture(autouse=True)
def _forget_shared_tasks() -> Iterator[None]:
    """``@app.task`` registers shared tasks with every app finalized later in the process.

    A task with invalid metadata would then break the next test's app, so drop what a test added.
    """
    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)


@pytest.fixture
def app() -> Celery:
    app = Celery("t")
    # The memory transport keeps its queues process-wide: a queue of our own starts empty.
    app.conf.update(tq_default_queue=f"tq.test-{uuid.uuid4().hex}")
    celery_tq.install(app, preset="testing")
    return app


def queued(app: Celery) -> int:
    """How many messages wait in the app's tq queue of the memory broker."""
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(app.conf.tq_default_queue).message_count)


# --- Priority -------------------------------------------------------------------------------------


def test_priority_levels_have_their_documented_values() -> None:
    assert Priority.BACKGROUND == 0
    assert Priority.LOW == 2
    assert Priority.NORMAL == 5
    assert Priority.HIGH == 7
    assert Priority.CRITICAL == 9


def test_higher_priority_means_more_urgent() -> None:
    order = [Priority.BACKGROUND, Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL]
    assert sorted(order) == order
    assert max(Priority) is Priority.CRITICAL


def test_priority_is_an_int_usable_wherever_a_number_is() -> None:
    assert isinstance(Priority.HIGH, int)
    assert Priority.HIGH + 1 == 8


def test_metadata_defaults_to_normal_priority_no_timeout_and_no_tags() -> None:
    metadata = TaskMetadata()
    assert metadata.priority == Priority.NORMAL
    assert metadata.timeout is None
    assert metadata.tags == frozenset()


# --- TaskMetadata validation ----------------------------------------------------------------------


@pytest.mark.parametrize("priority", [0, 1, 3, 4, 6, 8, 9, Priority.HIGH])
def test_any_int_from_zero_to_nine_is_a_valid_priority(priority: int) -> None:
    assert TaskMetadata(priority=priority).priority == priority


@pytest.mark.parametrize("priority", [-1, 10, 11, 42, 255])
def test_priority_outside_zero_to_nine_is_refused_not_clamped(priority: int) -> None:
    with pytest.raises(MetadataError, match="priority"):
        TaskMetadata(priority=priority)


@pytest.mark.parametrize("priority", [True, False, 5.0, 7.5, "5", "HIGH", None])
def test_priority_that_is_not_an_int_is_refused(priority: Any) -> None:
    with pytest.raises(MetadataError, match="priority"):
        TaskMetadata(priority=priority)


def test_metadata_error_is_also_a_value_error_and_a_task_error() -> None:
    with pytest.raises(ValueError):
        TaskMetadata(priority=10)
    assert issubclass(MetadataError, TaskError)
    assert issubclass(MetadataError, ValueError)


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_timeout_that_is_not_a_positive_finite_number_is_refused(timeout: float) -> None:
    with pytest.raises(MetadataError, match="timeout"):
        TaskMetadata(timeout=timeout)


@pytest.mark.parametrize("timeout", [True, "30", [30]])
def test_timeout_that_is_not_a_number_is_refused(timeout: Any) -> None:
    with pytest.raises(MetadataError, match="timeout"):
        TaskMetadata(timeout=timeout)


def test_timeout_is_kept_in_seconds_as_a_float() -> None:
    assert TaskMetadata(timeout=30).timeout == 30.0
    assert isinstance(TaskMetadata(timeout=30).timeout, float)
    assert TaskMetadata(timeout=0.25).timeout == 0.25


def test_tags_are_kept_as_a_frozen_set() -> None:
    metadata = TaskMetadata(tags=["billing", "vip", "billing"])
    assert metadata.tags == frozenset({"billing", "vip"})
    assert isinstance(metadata.tags, frozenset)


def test_a_single_tag_given_as_a_string_is_one_tag_not_its_letters() -> None:
    assert TaskMetadata(tags="billing").tags == frozenset({"billing"})


@pytest.mark.parametrize(
    "tag",
    ["", "x" * 65, "billing,vip", "two words", " leading", "tab\there", 5, None],
)
def test_empty_overlong_or_malformed_tag_is_refused(tag: Any) -> None:
    with pytest.raises(MetadataError, match="tag"):
        TaskMetadata(tags={tag} if tag is not None else [tag])


def test_a_tag_of_exactly_sixty_four_characters_is_accepted() -> None:
    tag = "x" * 64
    assert TaskMetadata(tags={tag}).tags == frozenset({tag})


@pytest.mark.parametrize("tag", ["billing", "eu-west", "team:ops", "v1.2", "user@host", "a/b", "c++", "_x"])
def test_tags_with_letters_digits_and_punctuation_are_accepted(tag: str) -> None:
    assert TaskMetadata(tags={tag}).tags == frozenset({tag})


def test_metadata_is_frozen() -> None:
    metadata = TaskMetadata()
    with pytest.raises(AttributeError):
        metadata.priority = 9  # type: ignore[misc]


# --- merged() -------------------------------------------------------------------------------------


def test_per_call_priority_replaces_the_task_priority() -> None:
    task = TaskMetadata(priority=Priority.LOW)
    assert task.merged(priority=9).priority == 9
    assert task.merged(priority=0).priority == 0


def test_per_call_timeout_replaces_the_task_timeout() -> None:
    assert TaskMetadata(timeout=30).merged(timeout=10).timeout == 10.0


def test_per_call_tags_add_to_the_task_tags() -> None:
    merged = TaskMetadata(tags={"billing"}).merged(tags={"vip"})
    assert merged.tags == frozenset({"billing", "vip"})


def test_merging_nothing_keeps_the_task_metadata() -> None:
    task = TaskMetadata(priority=7, timeout=30, tags={"billing"})
    assert task.merged() == task


def test_merging_does_not_change_the_original() -> None:
    task = TaskMetadata(priority=7, timeout=30, tags={"billing"})
    task.merged(priority=1, timeout=2, tags={"vip"})
    assert task == TaskMetadata(priority=7, timeout=30, tags={"billing"})


@pytest.mark.parametrize(
    "call",
    [
        {"priority": 10},
        {"priority": -1},
        {"priority": 1.0},
        {"timeout": 0},
        {"timeout": math.nan},
        {"tags": {""}},
    ],
)
def test_merging_an_invalid_per_call_value_is_refused(call: dict[str, Any]) -> None:
    with pytest.raises(MetadataError):
        TaskMetadata().merged(**call)


# --- headers and describe() -----------------------------------------------------------------------


def test_metadata_survives_a_round_trip_through_json_message_headers() -> None:
    metadata = TaskMetadata(priority=9, timeout=10, tags={"billing", "vip"})
    headers = json.loads(json.dumps(metadata.to_headers()))
    assert TaskMetadata.from_headers(headers, default=TaskMetadata()) == metadata


def test_headers_name_their_keys_with_the_tq_prefix() -> None:
    headers = TaskMetadata(priority=9, timeout=10, tags={"vip", "billing"}).to_headers()
    assert headers == {"tq_priority": 9, "tq_timeout": 10.0, "tq_tags": ["billing", "vip"]}


def test_headers_without_tq_keys_give_the_task_defaults() -> None:
    default = TaskMetadata(priority=7, timeout=30, tags={"billing"})
    assert TaskMetadata.from_headers({"lang": "py"}, default=default) == default


def test_headers_with_an_invalid_priority_are_refused() -> None:
    with pytest.raises(MetadataError):
        TaskMetadata.from_headers({"tq_priority": 12}, default=TaskMetadata())


def test_describe_lists_priority_tags_and_timeout() -> None:
    metadata = TaskMetadata(priority=9, timeout=10, tags={"vip", "billing"})
    assert metadata.describe() == "priority=9 tags=billing,vip timeout=10"


def test_describe_leaves_out_missing_tags_and_timeout() -> None:
    assert TaskMetadata().describe() == "priority=5"
    assert TaskMetadata(timeout=2.5).describe() == "priority=5 timeout=2.5"


# --- decoration time ------------------------------------------------------------------------------


def test_task_shortcut_with_priority_ten_is_refused_when_decorating() -> None:
    tq = celery_tq.install(Celery("t"), preset="testing")
    with pytest.raises(MetadataError, match="priority"):
        tq.task(priority=10)


@pytest.mark.parametrize(
    "options", [{"priority": -1}, {"timeout": 0}, {"timeout": -3}, {"tags": {"two words"}}, {"tags": {""}}]
)
def test_task_shortcut_with_invalid_metadata_is_refused_when_decorating(options: dict[str, Any]) -> None:
    tq = celery_tq.install(Celery("t"), preset="testing")
    with pytest.raises(MetadataError):
        tq.task(**options)


def test_task_shortcut_records_the_metadata_on_the_task() -> None:
    app = Celery("t")
    tq = celery_tq.install(app, preset="testing")

    @tq.task(priority=Priority.HIGH, timeout=30, tags={"billing"})
    def charge(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    assert charge.tq_metadata == TaskMetadata(priority=7, timeout=30, tags={"billing"})
    assert isinstance(charge, TqTask)


def test_plain_celery_form_records_the_metadata_on_the_task() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")

    @app.task(base=TqTask, tq_priority=7, tq_timeout=30, tq_tags=("billing",))
    def refund(order_id: int) -> None:
        return None

    assert refund.tq_metadata == TaskMetadata(priority=7, timeout=30, tags={"billing"})


def test_plain_celery_form_with_priority_42_is_refused_when_the_app_finalizes() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")

    # Celery builds the task class lazily: the decorator itself only returns a proxy.
    @app.task(base=TqTask, tq_priority=42)
    def refund(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError, match="42"):
        app.finalize()


def test_plain_celery_form_with_priority_42_is_refused_when_the_task_is_first_used() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")

    @app.task(base=TqTask, tq_priority=42)
    def refund(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError, match="42"):
        refund.delay(5)


def test_plain_celery_form_with_priority_42_is_refused_at_decoration_on_a_finalized_app() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    app.finalize()

    with pytest.raises(MetadataError, match="42"):

        @app.task(base=TqTask, tq_priority=42)
        def refund(order_id: int) -> None:
            return None


@pytest.mark.parametrize(
    "options", [{"tq_priority": -1}, {"tq_timeout": 0}, {"tq_timeout": math.inf}, {"tq_tags": ("a,b",)}]
)
def test_plain_celery_form_with_invalid_metadata_is_refused_on_a_finalized_app(
    options: dict[str, Any],
) -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    app.finalize()

    def refund() -> None:
        return None

    with pytest.raises(MetadataError):
        app.task(base=TqTask, **options)(refund)


def test_subclass_of_tqtask_with_invalid_priority_is_refused_at_class_creation() -> None:
    with pytest.raises(MetadataError):

        class Urgent(TqTask):
            tq_priority = 10


def test_task_inherits_the_metadata_of_its_tqtask_base_class() -> None:
    class Urgent(TqTask):
        tq_priority = 9
        tq_timeout = 30
        tq_tags = ("ops",)

    app = Celery("t")
    celery_tq.install(app, preset="testing")

    @app.task(base=Urgent, tq_tags=("billing",))
    def page() -> None:
        return None

    assert page.tq_metadata == TaskMetadata(priority=9, timeout=30, tags={"ops", "billing"})


def test_task_shortcut_keeps_the_priority_of_its_base_class() -> None:
    class Urgent(TqTask):
        tq_priority = 9

    app = Celery("t")
    tq = celery_tq.install(app, preset="testing")

    @tq.task(base=Urgent)
    def page() -> None:
        return None

    assert page.tq_metadata.priority == 9


# --- call time ------------------------------------------------------------------------------------


def test_a_valid_call_publishes_one_message_carrying_the_metadata(app: Celery) -> None:
    tq = celery_tq.system_for(app)

    @tq.task(priority=Priority.LOW, tags={"billing"})
    def charge(order_id: int) -> None:
        return None

    charge.apply_async((5,), priority=9, tags={"vip"}, timeout=10)

    assert queued(app) == 1
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(app.conf.tq_default_queue, no_ack=True)
    assert message.headers["tq_priority"] == 9
    assert message.headers["tq_tags"] == ["billing", "vip"]
    assert message.headers["tq_timeout"] == 10.0
    assert "[tq priority=9 tags=billing,vip timeout=10]" in message.headers["kwargsrepr"]


def test_the_metadata_handed_to_the_publisher_stays_out_of_the_message(app: Celery) -> None:
    tq = celery_tq.system_for(app)

    @tq.task(priority=Priority.LOW)
    def charge(order_id: int) -> None:
        return None

    charge.apply_async((5,), priority=8)

    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(app.conf.tq_default_queue, no_ack=True)
    assert message.headers["tq_priority"] == 8
    assert CALL_METADATA not in message.headers
    assert CALL_METADATA not in message.properties


def test_carried_reads_back_what_stamp_wrote_from_headers_and_from_a_request() -> None:
    metadata = TaskMetadata(priority=7, timeout=30, tags={"billing", "vip"})
    headers: dict[str, Any] = {"task": "shop.charge"}
    stamp(headers, metadata)

    assert TaskMetadata.from_headers(headers, TaskMetadata()) == metadata
    assert carried(headers) == {"tq_priority": 7, "tq_timeout": 30.0, "tq_tags": ["billing", "vip"]}

    class Request:  # a worker's request holds the headers as attributes too; those win
        tq_priority = 9

    request = Request()
    request.headers = headers  # type: ignore[attr-defined]
    assert carried(request)["tq_priority"] == 9
    assert carried(request)["tq_tags"] == ["billing", "vip"]
    assert carried({"task": "plain"}) == {}


@pytest.mark.parametrize(
    "options",
    [
        {"priority": 11},
        {"priority": -1},
        {"priority": 5.5},
        {"tags": {""}},
        {"tags": {"a b"}},
        {"timeout": 0},
    ],
)
def test_invalid_call_options_are_refused_at_call_time_and_publish_nothing(
    app: Celery, options: dict[str, Any]
) -> None:
    tq = celery_tq.system_for(app)

    @tq.task
    def charge(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError):
        charge.apply_async((5,), **options)
    assert queued(app) == 0


def test_priority_above_nine_is_refused_at_call_time(app: Celery) -> None:
    tq = celery_tq.system_for(app)

    @tq.task
    def charge(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError, match="11"):
        charge.apply_async((5,), priority=11)
    assert queued(app) == 0


def test_negative_priority_on_a_signature_is_refused_at_call_time(app: Celery) -> None:
    tq = celery_tq.system_for(app)

    @tq.task
    def charge(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError):
        charge.s(5).set(priority=-1).delay()
    assert queued(app) == 0


def test_empty_tag_on_a_signature_is_refused_at_call_time(app: Celery) -> None:
    tq = celery_tq.system_for(app)

    @tq.task
    def charge(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError):
        charge.s(5).set(tags={""}).delay()
    assert queued(app) == 0


def test_zero_timeout_is_refused_at_call_time_on_the_plain_celery_form(app: Celery) -> None:
    @app.task(base=TqTask)
    def charge(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError, match="timeout"):
        charge.apply_async((5,), timeout=0)
    assert queued(app) == 0


def test_invalid_priority_is_refused_when_sending_a_task_by_name(app: Celery) -> None:
    tq = celery_tq.system_for(app)

    @tq.task
    def charge(order_id: int) -> None:
        return None

    with pytest.raises(MetadataError):
        app.send_task(charge.name, (5,), priority=12)
    with pytest.raises(MetadataError):
        tq.submit(charge.name, 5, priority=10)
    assert queued(app) == 0


# --- runs in the caller's process (apply, task_always_eager) --------------------------------------


def test_an_eager_run_sees_the_metadata_of_its_call(app: Celery) -> None:
    app.conf.task_always_eager = True

    @app.task(base=TqTask, bind=True, name="t.seen", tq_tags=["shop"])
    def seen(self: TqTask) -> tuple[str | None, int, float | None, list[str]]:
        metadata = self.metadata
        return self.request.id, metadata.priority, metadata.timeout, sorted(metadata.tags)

    result = seen.apply_async(priority=Priority.HIGH, timeout=5, tags=["billing"])
    assert result.get() == (result.id, 7, 5.0, ["billing", "shop"])
    assert seen.apply().get()[1:] == (5, None, ["shop"])


def test_an_eager_run_with_a_priority_of_ten_is_refused_before_it_runs(app: Celery) -> None:
    ran: list[int] = []

    @app.task(base=TqTask, name="t.never")
    def never() -> None:
        ran.append(1)

    with pytest.raises(MetadataError, match="priority"):
        never.apply(priority=10)
    assert ran == []
