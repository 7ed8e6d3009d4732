"""Private Celery/kombu/py-amqp/redis-py members are used in ``celery_tq/celery_seam.py`` only.

The kombu transports under ``celery_tq/transport/`` subclass kombu's and may use their base
classes' members, each named in the module's docstring. ``python -m pytest tests/unit/test_seam.py``
is the check the README's contributing section names.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import celery_tq
from celery_tq import celery_seam

PACKAGE = Path(celery_tq.__file__).parent
SEAM = PACKAGE / "celery_seam.py"
TRANSPORT = PACKAGE / "transport"
#: Libraries whose private members only the seam may touch.
LIBRARIES = {"celery", "kombu", "amqp", "redis", "billiard", "vine"}
#: Names of ours set on objects of those libraries (an app's system, a channel's link...).
OURS = re.compile(r"^_tq_")
#: Underscore names that are public API of their library.
PUBLIC = {"_mapping"}  # SQLAlchemy's ``Row._mapping`` (documented: the row as a mapping)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not OURS.match(name) and name not in PUBLIC


def _sources(under: Path) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(under.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _defined(trees: list[ast.Module]) -> set[str]:
    """Underscore names our own code defines: functions, methods, class and module attributes,
    and attributes of ``self``/``cls`` it assigns."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
    return {name for name in names if _private(name)}


def _is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _uses(tree: ast.Module, ours: set[str]) -> Iterator[tuple[int, str]]:
    """(line, what) for every use of a private member of someone else's in ``tree``."""
    seam_names = {name for _, name in celery_seam.iter_members()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
            if name == "__class__" and isinstance(node.ctx, ast.Store):
                yield node.lineno, f"{ast.unparse(owner)}.__class__ = ..."
            elif name in seam_names and not _private(name):
                if not (isinstance(owner, ast.Name) and owner.id == "celery_seam"):
                    yield node.lineno, f"{ast.unparse(owner)}.{name}"
            elif not _private(name):
                continue
            elif _is_super(owner):
                yield node.lineno, f"super().{name}"
            elif isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                if name not in ours:  # a member of a base class of Celery's or kombu's
                    yield node.lineno, f"{owner.id}.{name}"
            else:  # our own objects' private members are only used through self and cls
                yield node.lineno, f"{ast.unparse(owner)}.{name}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = node.args
            if (
                node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(args) >= 2
                and isinstance(args[1], ast.Constant)
                and isinstance(args[1].value, str)
                and _private(args[1].value)
                and not (
                    isinstance(args[0], ast.Name) and args[0].id in ("self", "cls") and args[1].value in ours
                )
            ):
                yield node.lineno, f"{node.func.id}({ast.unparse(args[0])}, {args[1].value!r})"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] not in LIBRARIES:
                continue
            for alias in node.names:
                private_module = any(p.startswith("_") for p in parts[1:])
                if private_module or alias.name.startswith("_") or alias.name in seam_names:
                    yield node.lineno, f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(p.startswith("_") for p in parts[1:]):
                    yield node.lineno, f"import {alias.name}"


def test_no_private_member_is_used_outside_the_seam_and_the_transports() -> None:
    modules = [
        (path, tree) for path, tree in _sources(PACKAGE) if path != SEAM and TRANSPORT not in path.parents
    ]
    ours = _defined([tree for _, tree in modules])
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path, tree in modules
        for line, what in _uses(tree, ours)
    ]
    assert not offenders, "private members used outside celery_tq/celery_seam.py:\n" + "\n".join(offenders)


def _library_bases(module_name: str) -> list[type]:
    """The classes of Celery, kombu... that the classes of one of our modules derive from."""
    module = importlib.import_module(module_name)
    bases: list[type] = []
    for cls in vars(module).values():
        if inspect.isclass(cls) and cls.__module__ == module_name:
            bases += [b for b in cls.__mro__ if b.__module__.split(".")[0] in LIBRARIES and b not in bases]
    return bases


def _overrides(module_name: str) -> Iterator[tuple[str, str, str]]:
    """(our class, member, library class) for each private member our classes override."""
    module = importlib.import_module(module_name)
    for cls in vars(module).values():
        if not (inspect.isclass(cls) and cls.__module__ == module_name):
            continue
        for name in vars(cls):
            if not _private(name):
                continue
            for base in cls.__mro__[1:]:
                if base.__module__.split(".")[0] in LIBRARIES and name in vars(base):
                    yield cls.__qualname__, name, f"{base.__module__}:{base.__qualname__}"
                    break


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_each_transport_lists_the_kombu_members_it_uses_and_they_still_exist() -> None:
    modules = list(_sources(TRANSPORT))
    ours = _defined([tree for _, tree in modules])
    missing, gone = [], []
    for path, tree in modules:
        module_name = _module_name(path)
        docstring = ast.get_docstring(tree) or ""
        bases = _library_bases(module_name)
        uses = [
            (line, what, member)
            for line, what in _uses(tree, ours)
            for member in [what.rsplit(".", 1)[-1]]
            # our own channel's method called by our own QoS is ours
            if member not in ours or any(member in vars(base) for base in bases)
        ]
        # a member we also assign (so not flagged above) is still kombu's if a base class has it
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and _private(node.attr)
                and any(node.attr in vars(base) for base in bases)
            ):
                uses.append((node.lineno, f"self.{node.attr}", node.attr))
        uses += [(0, f"{cls}.{name} overrides {base}", name) for cls, name, base in _overrides(module_name)]
        for line, what, member in uses:
            if not re.search(rf"``[^`]*\b{re.escape(member)}\b[^`]*``", docstring):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}")
            if not any(_found(f"{b.__module__}:{b.__qualname__}", member) for b in bases):
                gone.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}")
    assert not missing, "kombu members used but not listed in the module docstring:\n" + "\n".join(
        sorted(set(missing))
    )
    assert not gone, "kombu members no longer in the installed kombu:\n" + "\n".join(sorted(set(gone)))


def test_backend_hooks_overridden_outside_the_transports_are_the_seams_hooks() -> None:
    hooks = {(target, name) for target, names in celery_seam.HOOKS.items() for name in names}
    unlisted = []
    for path, _tree in _sources(PACKAGE):
        if TRANSPORT in path.parents or path == SEAM or path.name == "pytest_plugin.py":
            continue
        for cls, name, base in _overrides(_module_name(path)):
            if not any(name == hook and _is_subclass(base, target) for target, hook in hooks):
                unlisted.append(f"{_module_name(path)}.{cls}.{name} overrides {base}")
    assert not unlisted, "overrides of private members not in celery_seam.HOOKS:\n" + "\n".join(unlisted)


def _is_subclass(base: str, target: str) -> bool:
    a, b = celery_seam.resolve(base), celery_seam.resolve(target)
    return inspect.isclass(a) and inspect.isclass(b) and issubclass(a, b)


def _found(target: str, name: str) -> bool:
    """``name`` is an attribute of ``target``, or (an instance attribute) one its class's
    ``__init__`` or another method of its classes assigns."""
    obj = celery_seam.resolve(target)
    if hasattr(obj, name):
        return True
    if not inspect.isclass(obj):
        return False
    assigned = re.compile(rf"self\.{re.escape(name)}\s*(:[^=]*)?=[^=]")
    for cls in obj.__mro__:
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if assigned.search(source):
            return True
    return False


@pytest.mark.parametrize(("target", "name"), list(celery_seam.iter_members()))
def test_the_installed_versions_still_have_each_member_the_seam_uses(target: str, name: str) -> None:
    assert _found(target, name), (
        f"{target} has no {name} in this version: celery_tq/celery_seam.py must change with it"
    )


def test_every_private_member_the_seam_uses_is_listed_for_the_version_check() -> None:
    tree = ast.parse(SEAM.read_text())
    listed = {name for _, name in celery_seam.iter_members()}
    used = {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and _private(node.attr)
    } | {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _private(node.args[1].value)
    }
    assert used <= listed, sorted(used - listed)
