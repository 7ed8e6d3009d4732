"""Celery config module for the production preset: ``app.config_from_object("config.production")``.

Environment variables override the preset: TQ_BROKER_URL, TQ_RESULT_BACKEND, TQ_TIMEOUT_GRACE,
TQ_PRIORITY_BANDS (JSON, e.g. '{"tq.high": [7, 9], "tq.default": [0, 6]}').
"""

import json
import os

from celery_tq import presets

globals().update(presets.production())

# The preset itself reads TQ_BROKER_URL (a redis:// URL becomes the reliable tq+redis://),
# TQ_RESULT_BACKEND and TQ_REGISTRY_URL.
tq_timeout_grace = float(os.environ.get("TQ_TIMEOUT_GRACE", tq_timeout_grace))  # noqa: F821
if os.environ.get("TQ_PRIORITY_BANDS"):
    tq_priority_bands = {q: tuple(b) for q, b in json.loads(os.environ["TQ_PRIORITY_BANDS"]).items()}
