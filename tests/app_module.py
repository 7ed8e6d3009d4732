"""A test's own Celery app module: written into its temporary directory, imported in the test's
process, and run by the workers the test starts."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]


@contextmanager
def app_module(
    directory: Path, name: str, source: str, env: Mapping[str, str]
) -> Iterator[tuple[Any, dict[str, str]]]:
    """Write ``source`` as module ``name`` in ``directory`` and import it with ``env`` set (what
    it reads at import); yield its ``app`` and the environment a worker running it needs. After:
    the app closed, the module forgotten, the environment as it was."""
    (directory / f"{name}.py").write_text(source)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    sys.path.insert(0, str(directory))
    sys.modules.pop(name, None)
    try:
        module = importlib.import_module(name)
        yield module.app, {**env, "PYTHONPATH": f"{directory}:{ROOT}"}
        module.app.close()
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
