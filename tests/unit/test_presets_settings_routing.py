"""Presets, install(), TqSettings and priority routing: what an app looks like once celery-tq is in."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, _state
from celery.app.defaults import DEFAULTS

import celery_tq
from celery_tq import Priority, presets
from celery_tq.errors import ConfigurationError
from celery_tq.routing import PriorityRouter, broker_kind, to_broker_priority
from celery_tq.settings import TqSettings
from celery_tq.transport.sqlite import db_path

PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "development": presets.development,
    "testing": presets.testing,
    "production": presets.production,
}
BANDS = {"tq.high": (7, 9), "tq.default": (3, 6), "tq.low": (0, 2)}
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Presets read the environment; shared tasks would leak into later apps."""
    monkeypatch.setenv("TQ_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TQ_BROKER_URL", raising=False)
    monkeypatch.delenv("TQ_RESULT_BACKEND", raising=False)
    monkeypatch.delenv("TQ_SENTINEL_MASTER", raising=False)
    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)


# --- presets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_a_plain_dict_of_celery_settings_and_tq_keys(name: str) -> None:
    settings = PRESETS[name]()
    assert type(settings) is dict
    unknown = [key for key in settings if key not in DEFAULTS and not key.startswith("tq_")]
    assert unknown == []
    assert json.loads(json.dumps(settings)) == settings


@pytest.mark.parametrize("name", PRESETS)
def test_preset_accepts_and_sends_json_only(name: str) -> None:
    settings = PRESETS[name]()
    assert settings["task_serializer"] == "json"
    assert settings["result_serializer"] == "json"
    assert settings["accept_content"] == ["json"]
    assert settings["result_accept_content"] == ["json"]
    assert "pickle" not in json.dumps(settings)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_keeps_priority_meaningful_with_prefetch_one_and_late_ack(name: str) -> None:
    settings = PRESETS[name]()
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["task_acks_late"] is True


@pytest.mark.parametrize("name", PRESETS)
def test_preset_turns_on_the_events_flower_needs(name: str) -> None:
    settings = PRESETS[name]()
    assert settings["worker_send_task_events"] is True
    assert settings["task_send_sent_event"] is True
    assert settings["task_track_started"] is True


@pytest.mark.parametrize("name", PRESETS)
def test_calling_a_preset_twice_gives_independent_dicts(name: str) -> None:
    first = PRESETS[name]()
    first["accept_content"].append("pickle")
    assert PRESETS[name]()["accept_content"] == ["json"]


def broker_file(url: str) -> Path:
    """The file an embedded-broker URL names, as the transport reads it."""
    return db_path(url.removeprefix("tq+")).resolve()


def test_development_preset_keeps_its_files_under_tq_data_dir(tmp_path: Path) -> None:
    settings = presets.development()
    broker = settings["broker_url"]
    assert broker.startswith("tq+sqlite:///")
    assert broker_file(broker).parent == tmp_path.resolve()
    assert settings["result_backend"].startswith(("tq+sqlite:///", "db+sqlite:///"))
    assert str(tmp_path.resolve()) in settings["result_backend"]


def test_development_preset_defaults_to_dot_celery_tq_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TQ_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    broker = presets.development()["broker_url"]
    assert broker_file(broker).parent == (tmp_path / ".celery_tq").resolve()


def test_development_broker_url_uses_the_documented_absolute_form(tmp_path: Path) -> None:
    expected = tmp_path.resolve() / "broker.db"
    assert presets.development()["broker_url"] == f"tq+sqlite:///{expected}"


def test_testing_preset_runs_in_one_process_in_memory() -> None:
    settings = presets.testing()
    assert settings["broker_url"] == "memory://"
    assert settings["result_backend"] == "tq+memory://"


def test_production_preset_loses_nothing_when_a_worker_or_broker_fails() -> None:
    settings = presets.production()
    assert settings["task_reject_on_worker_lost"] is True
    assert settings["task_retry_on_worker_lost"] is True
    assert settings["broker_heartbeat"] > 0
    assert settings["broker_transport_options"]["confirm_publish"] is True
    assert settings["result_backend_always_retry"] is True


def test_production_preset_reads_broker_and_backend_urls_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TQ_BROKER_URL", "amqp://app:secret@rabbit:5672/shop")
    monkeypatch.setenv("TQ_RESULT_BACKEND", "db+postgresql+psycopg://app@pg/shop")
    settings = presets.production()
    assert settings["broker_url"] == "amqp://app:secret@rabbit:5672/shop"
    assert settings["result_backend"] == "db+postgresql+psycopg://app@pg/shop"


def test_production_preset_puts_a_sentinel_broker_on_the_reliable_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TQ_BROKER_URL", "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0")
    monkeypatch.setenv("TQ_SENTINEL_MASTER", "mymaster")
    settings = presets.production()
    assert settings["broker_url"].startswith("tq+sentinel://10.0.0.1:26379;")
    assert settings["broker_transport_options"] == {"confirm_publish": True, "master_name": "mymaster"}
    assert broker_kind(settings["broker_url"]) == "redis"


def test_production_preset_defaults_to_local_rabbitmq_and_postgresql() -> None:
    settings = presets.production()
    assert broker_kind(settings["broker_url"]) == "amqp"
    assert "postgresql" in settings["result_backend"]


# --- install --------------------------------------------------------------------------------------


def test_install_applies_the_preset_to_the_app(tmp_path: Path) -> None:
    app = Celery("t")
    celery_tq.install(app, preset="development")
    assert app.conf.broker_url.startswith("tq+sqlite:///")
    assert str(tmp_path.resolve()) in app.conf.broker_url
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.accept_content == ["json"]


def test_install_uses_the_development_preset_by_default() -> None:
    app = Celery("t")
    celery_tq.install(app)
    assert app.conf.broker_url.startswith("tq+sqlite:///")


def test_install_accepts_a_preset_given_as_a_dict() -> None:
    app = Celery("t")
    celery_tq.install(app, preset={**presets.testing(), "worker_concurrency": 3})
    assert app.conf.broker_url == "memory://"
    assert app.conf.worker_concurrency == 3


def test_user_settings_updated_before_install_win_over_the_preset() -> None:
    app = Celery("t")
    app.conf.update(worker_prefetch_multiplier=4, broker_url=REDIS_URL)
    celery_tq.install(app, preset="testing")
    assert app.conf.worker_prefetch_multiplier == 4
    assert app.conf.broker_url == REDIS_URL
    assert app.conf.task_acks_late is True


def test_user_settings_updated_after_install_win_over_the_preset() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    app.conf.update(worker_prefetch_multiplier=4)
    assert app.conf.worker_prefetch_multiplier == 4
    assert app.conf.task_acks_late is True


def test_user_settings_win_when_the_app_was_configured_before_install() -> None:
    app = Celery("t")
    app.conf.update(worker_prefetch_multiplier=4)
    assert app.conf.worker_prefetch_multiplier == 4  # reading a setting configures the app
    celery_tq.install(app, preset="testing")
    assert app.conf.worker_prefetch_multiplier == 4
    assert app.conf.broker_url == "memory://"


def test_broker_given_to_the_celery_constructor_wins_over_the_preset() -> None:
    app = Celery("t", broker=REDIS_URL)
    celery_tq.install(app, preset="testing")
    assert app.conf.broker_url == REDIS_URL


class ConfigModule:
    """Like a ``celeryconfig`` module: settings as attributes."""

    worker_prefetch_multiplier = 4


CONFIG_SOURCES = {"dict": lambda: {"worker_prefetch_multiplier": 4}, "object": lambda: ConfigModule}


@pytest.mark.parametrize("source", CONFIG_SOURCES)
def test_settings_from_config_from_object_before_install_win_over_the_preset(source: str) -> None:
    app = Celery("t")
    app.config_from_object(CONFIG_SOURCES[source]())
    celery_tq.install(app, preset="testing")
    assert app.conf.worker_prefetch_multiplier == 4


@pytest.mark.parametrize("source", CONFIG_SOURCES)
def test_settings_from_config_from_object_after_install_win_over_the_preset(source: str) -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    app.config_from_object(CONFIG_SOURCES[source]())
    assert app.conf.worker_prefetch_multiplier == 4


def test_settings_from_config_from_object_leave_the_rest_of_the_preset_in_place() -> None:
    app = Celery("t")
    app.config_from_object({"worker_concurrency": 3})
    celery_tq.install(app, preset="testing")
    assert app.conf.worker_concurrency == 3
    assert app.conf.broker_url == "memory://"
    assert app.conf.task_acks_late is True


def test_preset_survives_config_from_object_on_an_app_already_configured() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    assert app.conf.task_acks_late is True
    app.config_from_object({"worker_concurrency": 3})
    assert app.conf.worker_concurrency == 3
    assert app.conf.task_acks_late is True
    assert app.conf.broker_url == "memory://"


def test_install_is_idempotent_and_system_for_returns_the_same_system() -> None:
    app = Celery("t")
    system = celery_tq.install(app, preset="testing")
    assert celery_tq.install(app, preset="testing") is system
    assert celery_tq.system_for(app) is system
    assert [r for r in app.conf.task_routes if isinstance(r, PriorityRouter)] != []
    assert len([r for r in app.conf.task_routes if isinstance(r, PriorityRouter)]) == 1


def test_system_for_an_app_never_installed_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="install"):
        celery_tq.system_for(Celery("t"))


def test_each_app_gets_its_own_system() -> None:
    first, second = Celery("a"), Celery("b")
    assert celery_tq.install(first, preset="testing") is not celery_tq.install(second, preset="testing")


def test_unknown_preset_is_a_configuration_error_on_a_configured_app() -> None:
    app = Celery("t")
    app.conf.update(broker_url="memory://")
    assert app.conf.broker_url == "memory://"
    with pytest.raises(ConfigurationError, match="unknown preset 'staging'"):
        celery_tq.install(app, preset="staging")


def test_unknown_preset_is_a_configuration_error_by_the_time_the_app_reads_its_settings() -> None:
    app = Celery("t")
    with pytest.raises(ConfigurationError, match="unknown preset 'staging'"):
        celery_tq.install(app, preset="staging")
        _ = app.conf.broker_url


def test_unknown_preset_is_refused_by_install_itself() -> None:
    with pytest.raises(ConfigurationError, match="unknown preset"):
        celery_tq.install(Celery("t"), preset="staging")


def test_presets_resolve_names_dicts_and_none() -> None:
    assert presets.resolve("testing") == presets.testing()
    assert presets.resolve({"worker_concurrency": 2}) == {"worker_concurrency": 2}
    assert presets.resolve(None) == {}
    with pytest.raises(ConfigurationError, match="development, testing, production"):
        presets.resolve("staging")


# --- TqSettings -----------------------------------------------------------------------------------


def test_settings_have_documented_defaults() -> None:
    settings = TqSettings.from_app(Celery("t"))
    assert settings.default_queue == "celery"  # Celery's task_default_queue; the presets set tq.default
    assert settings.priority_bands is None
    assert settings.result_expires == 7 * 24 * 3600
    assert settings.max_priority >= 9
    assert settings.registry_url is None
    assert settings.prefetch_extra == 1
    assert settings.pipeline_redis_acks is True


@pytest.mark.parametrize("value", ["no", 0, None])
def test_pipeline_redis_acks_must_be_a_bool(value: Any) -> None:
    app = Celery("t")
    app.conf.update(tq_pipeline_redis_acks=value)
    with pytest.raises(ConfigurationError, match="tq_pipeline_redis_acks must be True or False"):
        TqSettings.from_app(app)


def test_settings_read_the_tq_keys_of_the_app() -> None:
    app = Celery("t")
    app.conf.update(tq_timeout_grace=2.5, tq_default_queue="tq.main", tq_registry_url="tq+sqlite:///r.db")
    settings = TqSettings.from_app(app)
    assert settings.timeout_grace == 2.5
    assert settings.default_queue == "tq.main"
    assert settings.registry_url == "tq+sqlite:///r.db"


def test_negative_timeout_grace_is_a_configuration_error() -> None:
    app = Celery("t")
    app.conf.update(tq_timeout_grace=-1)
    with pytest.raises(ConfigurationError, match="tq_timeout_grace"):
        TqSettings.from_app(app)


@pytest.mark.parametrize("extra", [-1, 1.5, "1", True])
def test_prefetch_extra_must_be_a_non_negative_int(extra: Any) -> None:
    app = Celery("t")
    app.conf.update(tq_prefetch_extra=extra)
    with pytest.raises(ConfigurationError, match="tq_prefetch_extra must be an int >= 0"):
        TqSettings.from_app(app)


def bands_of(bands: Any) -> TqSettings:
    app = Celery("t")
    app.conf.update(tq_priority_bands=bands, task_default_queue="tq.default")
    return TqSettings.from_app(app)


def test_overlapping_priority_bands_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="priority 6 is in two bands"):
        bands_of({"tq.high": (6, 9), "tq.default": (3, 6)})


def test_priority_band_with_low_above_high_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="low 9 > high 7"):
        bands_of({"tq.high": (9, 7)})


@pytest.mark.parametrize("band", [(7, 10), (-1, 2), (7,), (1, 2, 3), 7, ("7", "9"), (7.0, 9.0)])
def test_priority_band_outside_zero_to_nine_or_malformed_is_a_configuration_error(band: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"tq\.high"):
        bands_of({"tq.high": band})


def test_priority_bands_that_are_not_a_mapping_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="tq_priority_bands"):
        bands_of([("tq.high", (7, 9))])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tq_store_retry_timeout", -1, "tq_store_retry_timeout must be >= 0 seconds"),
        ("tq_store_retry_timeout", "60", "tq_store_retry_timeout must be a number of seconds"),
        ("tq_result_poll_interval", 0, "tq_result_poll_interval must be > 0 seconds"),
        ("tq_result_poll_interval", None, "tq_result_poll_interval must be a number of seconds"),
        ("tq_metric_tags", "billing", "tq_metric_tags must be a list or set of tag names"),
        ("tq_metric_tags", ["billing", 7], "tq_metric_tags must hold non-empty strings, not 7"),
        ("tq_metric_tags", 3, "tq_metric_tags must be a list or set"),
        ("tq_timeout_grace", "5", "tq_timeout_grace must be a number of seconds"),
        ("tq_retry_backoff_max", True, "tq_retry_backoff_max must be a number of seconds"),
        ("tq_event_batch", 0, "tq_event_batch must be an int >= 1"),
        ("tq_max_priority", 5, "tq_max_priority must be an int >= 9"),
        ("tq_pause_unwatched_events", "no", "tq_pause_unwatched_events must be True or False"),
        ("tq_registry_url", 5432, "tq_registry_url must be a URL string"),
        ("tq_worker_lost_delay", 20, "tq_worker_lost_delay must be <= tq_worker_lost_delay_max"),
    ],
)
def test_a_bad_setting_is_a_configuration_error_naming_it(key: str, value: Any, message: str) -> None:
    app = Celery("t")
    app.conf.update({key: value})
    with pytest.raises(ConfigurationError, match=message):
        TqSettings.from_app(app)


def test_a_bad_setting_fails_install_of_a_configured_app() -> None:
    app = Celery("t", set_as_current=False)
    app.conf.update(tq_result_poll_interval=-0.5)
    app.conf.get("broker_url")  # the configuration is built: install reads it at once
    with pytest.raises(ConfigurationError, match="tq_result_poll_interval"):
        celery_tq.install(app, preset="testing")


def test_store_poll_and_metric_settings_are_fields_with_defaults() -> None:
    settings = TqSettings.from_app(Celery("t"))
    assert (settings.store_retry_timeout, settings.result_poll_interval) == (60.0, 0.02)
    assert settings.metric_tags == frozenset()
    app = Celery("t")
    app.conf.update(tq_store_retry_timeout=5, tq_result_poll_interval=0.1, tq_metric_tags=("vip", "billing"))
    settings = TqSettings.from_app(app)
    assert (settings.store_retry_timeout, settings.result_poll_interval) == (5.0, 0.1)
    assert settings.metric_tags == {"vip", "billing"}


def test_an_installed_app_reads_its_settings_once() -> None:
    app = Celery("t", set_as_current=False)
    tq = celery_tq.install(app, preset="testing")
    app.conf.update(tq_timeout_grace=3.0, result_backend="tq+memory://")
    assert tq.settings.timeout_grace == 3.0
    assert tq.settings is tq.settings
    app.conf.tq_timeout_grace = 9.0  # after the configuration was built: not read again
    assert tq.settings.timeout_grace == 3.0
    assert app.backend.retry_for == tq.settings.store_retry_timeout


@pytest.mark.parametrize(
    ("priority", "queue"),
    [
        (9, "tq.high"),
        (8, "tq.high"),
        (7, "tq.high"),
        (6, "tq.default"),
        (3, "tq.default"),
        (2, "tq.low"),
        (0, "tq.low"),
    ],
)
def test_each_priority_goes_to_the_queue_of_its_band(priority: int, queue: str) -> None:
    assert bands_of(BANDS).queue_for(priority) == queue


def test_priority_outside_every_band_goes_to_the_default_queue() -> None:
    settings = bands_of({"tq.urgent": (8, 9)})
    assert settings.queue_for(8) == "tq.urgent"
    assert settings.queue_for(5) == "tq.default"


def test_without_bands_every_priority_goes_to_the_default_queue() -> None:
    settings = bands_of(None)
    assert {settings.queue_for(p) for p in range(10)} == {"tq.default"}
    assert settings.queues() == ["tq.default"]


def test_band_queues_are_listed_most_urgent_first() -> None:
    shuffled = {"tq.low": (0, 2), "tq.high": (7, 9), "tq.default": (3, 6)}
    assert bands_of(shuffled).queues() == ["tq.high", "tq.default", "tq.low"]


# --- routing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("amqp://guest@localhost//", "amqp"),
        ("pyamqp://guest@localhost//", "amqp"),
        ("amqps://guest@localhost//", "amqp"),
        ("redis://localhost:6379/0", "redis"),
        ("rediss://localhost:6379/0", "redis"),
        ("sentinel://localhost:26379", "redis"),
        ("tq+redis://localhost:6379/0", "redis"),
        ("tq+sqlite:///tmp/broker.db", "embedded"),
        ("memory://", "memory"),
        ("filesystem://", "filesystem"),
        ("sqs://", "sqs"),
        (None, "amqp"),
    ],
)
def test_broker_kind_is_read_from_the_url_scheme(url: str | None, kind: str) -> None:
    assert broker_kind(url) == kind


@pytest.mark.parametrize("priority", range(10))
def test_redis_gets_the_priority_inverted_because_it_pops_step_zero_first(priority: int) -> None:
    assert to_broker_priority("redis", priority) == 9 - priority


@pytest.mark.parametrize("driver", ["amqp", "sqlite", "embedded", "memory"])
@pytest.mark.parametrize("priority", range(10))
def test_other_brokers_get_the_priority_unchanged(driver: str, priority: int) -> None:
    assert to_broker_priority(driver, priority) == priority


def test_critical_is_popped_first_on_redis_and_served_first_on_amqp() -> None:
    assert to_broker_priority("redis", Priority.CRITICAL) < to_broker_priority("redis", Priority.BACKGROUND)
    assert to_broker_priority("amqp", Priority.CRITICAL) > to_broker_priority("amqp", Priority.BACKGROUND)


def test_install_on_amqp_declares_every_queue_with_x_max_priority() -> None:
    app = Celery("t", broker=AMQP_URL)
    celery_tq.install(app, preset="production")
    queues = list(app.conf.task_queues)
    assert "tq.default" in [q.name for q in queues]
    for queue in queues:
        assert queue.queue_arguments["x-max-priority"] >= 9
    assert app.conf.task_queue_max_priority >= 9


def test_install_on_amqp_with_bands_declares_each_band_queue_with_x_max_priority() -> None:
    app = Celery("t", broker=AMQP_URL)
    app.conf.update(tq_priority_bands=BANDS)
    celery_tq.install(app, preset="production")
    queues = {q.name: q for q in app.conf.task_queues}
    assert set(BANDS) <= set(queues)
    assert all(q.queue_arguments["x-max-priority"] >= 9 for q in queues.values())


def test_install_on_redis_uses_one_priority_step_per_level() -> None:
    app = Celery("t", broker=REDIS_URL)
    celery_tq.install(app, preset="testing")
    assert app.conf.broker_transport_options["priority_steps"] == list(range(10))


def test_install_on_redis_keeps_the_users_other_transport_options() -> None:
    app = Celery("t", broker=REDIS_URL)
    app.conf.update(broker_transport_options={"visibility_timeout": 7200})
    celery_tq.install(app, preset="production")
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 7200
    assert options["priority_steps"] == list(range(10))


def test_install_on_memory_leaves_transport_options_alone() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    assert "priority_steps" not in (app.conf.broker_transport_options or {})
    assert all(not q.queue_arguments for q in app.conf.task_queues)


def test_presets_send_tasks_to_tq_default() -> None:
    app = Celery("t", broker=AMQP_URL)
    celery_tq.install(app, preset="production")
    assert app.amqp.router.route({}, "t.charge")["queue"].name == "tq.default"
    assert [q.name for q in app.conf.task_queues] == ["tq.default"]


def test_the_users_task_default_queue_wins_over_the_presets_tq_default() -> None:
    app = Celery("t", broker=AMQP_URL)
    app.conf.update(task_default_queue="celery")
    celery_tq.install(app, preset="production")
    assert app.amqp.router.route({"priority": 9}, "t.charge")["queue"].name == "celery"
    assert [q.name for q in app.conf.task_queues] == ["celery"]


def test_install_keeps_queues_the_user_declared() -> None:
    from kombu import Queue

    app = Celery("t", broker=AMQP_URL)
    app.conf.update(task_queues=[Queue("mine")])
    celery_tq.install(app, preset="production")
    assert [q.name for q in app.conf.task_queues] == ["mine"]


def banded_app(broker: str = AMQP_URL) -> Celery:
    app = Celery("t", broker=broker)
    app.conf.update(tq_priority_bands=BANDS)
    celery_tq.install(app, preset="testing")
    return app


def test_priority_router_sends_priority_eight_to_the_high_band_queue() -> None:
    app = banded_app()
    route = app.amqp.router.route({"priority": 8}, "t.charge")
    assert route["queue"].name == "tq.high"


def test_priority_router_sends_each_priority_to_its_band_queue() -> None:
    app = banded_app()
    routed = {p: app.amqp.router.route({"priority": p}, "t.charge")["queue"].name for p in range(10)}
    assert routed == {p: bands_of(BANDS).queue_for(p) for p in range(10)}


def test_explicit_queue_wins_over_the_priority_router() -> None:
    app = banded_app()
    route = app.amqp.router.route({"priority": 8, "queue": "tq.low"}, "t.charge")
    assert route["queue"].name == "tq.low"


def test_priority_router_uses_the_tasks_own_priority_when_the_call_gives_none() -> None:
    app = banded_app()
    tq = celery_tq.system_for(app)

    @tq.task(priority=Priority.LOW)
    def cleanup() -> None:
        return None

    route = app.amqp.router.route({}, cleanup.name, task_type=cleanup)
    assert route["queue"].name == "tq.low"


def test_priority_router_refuses_a_priority_outside_zero_to_nine() -> None:
    from celery_tq.errors import MetadataError

    app = banded_app()
    with pytest.raises(MetadataError):
        app.amqp.router.route({"priority": 10}, "t.charge")


def test_users_own_routes_come_before_the_priority_router() -> None:
    app = Celery("t", broker=AMQP_URL)
    app.conf.update(tq_priority_bands=BANDS, task_routes={"t.report": {"queue": "reports"}})
    celery_tq.install(app, preset="testing")
    assert app.amqp.router.route({"priority": 9}, "t.report")["queue"].name == "reports"
    assert app.amqp.router.route({"priority": 9}, "t.charge")["queue"].name == "tq.high"


def test_urgent_call_is_published_to_the_high_band_queue() -> None:
    suffix = uuid.uuid4().hex
    bands = {f"tq.high-{suffix}": (7, 9), f"tq.low-{suffix}": (0, 6)}
    app = Celery("t")
    app.conf.update(tq_priority_bands=bands)
    tq = celery_tq.install(app, preset="testing")

    @tq.task
    def charge(order_id: int) -> None:
        return None

    def waiting(queue: str) -> int:
        with app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue).message_count)

    charge.apply_async((5,), priority=8)
    charge.apply_async((6,))
    assert waiting(f"tq.high-{suffix}") == 1
    assert waiting(f"tq.low-{suffix}") == 1


def test_amqp_links_with_heartbeats_get_socket_timeouts_so_a_frozen_link_cannot_hang_a_worker() -> None:
    app = Celery("t", broker="amqp://guest:guest@127.0.0.1:5672//")
    celery_tq.install(app, preset="production")
    options = app.conf.broker_transport_options
    assert options["read_timeout"] == options["write_timeout"] == 10.0
    assert options["confirm_publish"] is True


def test_amqp_links_without_heartbeats_keep_blocking_reads() -> None:
    app = Celery("t", broker="amqp://guest:guest@127.0.0.1:5672//")
    app.conf.update(broker_heartbeat=0)
    celery_tq.install(app, preset="production")
    assert "read_timeout" not in app.conf.broker_transport_options


def test_a_long_heartbeat_raises_the_socket_timeout_to_match() -> None:
    app = Celery("t", broker="amqp://guest:guest@127.0.0.1:5672//")
    app.conf.update(broker_heartbeat=60, broker_transport_options={"write_timeout": 5})
    celery_tq.install(app, preset="production")
    assert app.conf.broker_transport_options == {"read_timeout": 60.0, "write_timeout": 5}
