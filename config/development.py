"""Celery config module for the development preset: ``app.config_from_object("config.development")``.

Environment variables override the preset: TQ_BROKER_URL, TQ_RESULT_BACKEND, TQ_TIMEOUT_GRACE,
TQ_PRIORITY_BANDS (JSON, e.g. '{"tq.high": [7, 9], "tq.default": [0, 6]}').
"""

import json
import os

from celery_tq import presets

globals().update(presets.development())

broker_url = os.environ.get("TQ_BROKER_URL", broker_url)  # noqa: F821 (set by the preset)
result_backend = os.environ.get("TQ_RESULT_BACKEND", result_backend)  # noqa: F821
tq_timeout_grace = float(os.environ.get("TQ_TIMEOUT_GRACE", tq_timeout_grace))  # noqa: F821
if os.environ.get("TQ_PRIORITY_BANDS"):
    tq_priority_bands = {q: tuple(b) for q, b in json.loads(os.environ["TQ_PRIORITY_BANDS"]).items()}
