"""Flower config for celery-tq: ``celery -A mod flower --conf=config/flowerconfig.py``.

Flower executes this file and takes every global whose name is a Flower option. Options given on
the command line still win over this file; ``FLOWER_<OPTION>`` environment variables are read first
and are visible here through ``tornado.options.options``.

Environment:

* ``TQ_ENV``: ``development`` (default) or ``production``.
* ``TQ_FLOWER_PORT``: the port (default 5555).
* ``TQ_FLOWER_ADDRESS``: production only, the address to bind (default ``0.0.0.0``). Development
  always binds 127.0.0.1.
* ``TQ_FLOWER_BASIC_AUTH``: ``user:password``, comma-separated for several users. In production
  Flower refuses to start unless this, ``--basic-auth``/``FLOWER_BASIC_AUTH`` or OAuth
  (``--auth``/``FLOWER_AUTH`` with ``FLOWER_AUTH_PROVIDER``, ``FLOWER_OAUTH2_KEY``,
  ``FLOWER_OAUTH2_SECRET``, ``FLOWER_OAUTH2_REDIRECT_URI``) is set.
* ``TQ_FLOWER_DB``: a file path; when set, Flower keeps its task list across restarts there.

Caveat: Flower's authentication does NOT cover ``/metrics`` and ``/healthcheck``; both answer
anyone who can reach the port, whatever auth is configured. In production put Flower behind a
reverse proxy that does not forward those two paths to the outside (or only to your Prometheus).
"""

import os
from typing import Any

from tornado.options import options as _flower_options

_env = os.environ.get("TQ_ENV", "development").strip().lower() or "development"
if _env not in ("development", "production"):
    raise SystemExit(f"celery-tq flowerconfig: TQ_ENV must be 'development' or 'production', not {_env!r}")

_port = os.environ.get("TQ_FLOWER_PORT", "5555").strip()
if not _port.isdigit() or not 0 < int(_port) < 65536:
    raise SystemExit(f"celery-tq flowerconfig: TQ_FLOWER_PORT must be a port number, not {_port!r}")
port = int(_port)

# The tq metadata (" [tq priority=9 tags=billing,vip timeout=10]") is written into each task's
# kwargsrepr, which Flower shows as "kwargs" and searches: keep that column on the tasks page.
tasks_columns = "name,uuid,state,kwargs,received,runtime,worker"


def format_task(task: Any) -> Any:
    """Pages only (the API keeps kwargs as sent): show the tq metadata first, before the kwargs.

    Flower cuts long cells in the task list, so ``{'order': ...} [tq priority=9 tags=vip]`` is shown
    as ``[tq priority=9 tags=vip] {'order': ...}``. Flower passes a copy of the task.
    """
    kwargs = getattr(task, "kwargs", None)
    if isinstance(kwargs, str) and kwargs.endswith("]") and " [tq " in kwargs:
        head, _, meta = kwargs.rpartition(" [tq ")
        task.kwargs = f"[tq {meta} {head}"
    return task


if _env == "development":
    address = "127.0.0.1"
else:
    address = os.environ.get("TQ_FLOWER_ADDRESS", "0.0.0.0").strip() or "0.0.0.0"

_basic_auth = [c.strip() for c in os.environ.get("TQ_FLOWER_BASIC_AUTH", "").split(",") if c.strip()]
for _credential in _basic_auth:
    _user, _sep, _password = _credential.partition(":")
    if not (_user and _sep and _password):
        raise SystemExit(
            "celery-tq flowerconfig: TQ_FLOWER_BASIC_AUTH must be 'user:password' "
            "(comma-separated for several users), with a non-empty user and password"
        )
if _basic_auth:
    basic_auth = _basic_auth

if (
    _env == "production"
    and not _basic_auth
    and not (getattr(_flower_options, "basic_auth", None) or getattr(_flower_options, "auth", None))
):
    raise SystemExit(
        "celery-tq flowerconfig: refusing to start Flower in production without authentication: "
        "set TQ_FLOWER_BASIC_AUTH=user:password (or Flower's --basic-auth, or OAuth with --auth and "
        "--auth_provider)"
    )

_db = os.environ.get("TQ_FLOWER_DB", "").strip()
if _db:
    persistent = True
    db = os.path.abspath(_db)
