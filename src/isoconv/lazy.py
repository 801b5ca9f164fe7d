"""Imports deferred to the first use, so that a command loads only what it runs.

`import torch` takes seconds and torchvision seconds more; `isoconv --help`, `recipes` and `models` need neither,
and training with the device loader needs no torchvision. Three stand-ins, each declared at a module's top level:

* `lazy_module("torchvision.transforms.v2.functional")`: imports the module at its first attribute access.
* `lazy_function("isoconv.train", "train")`: a function that imports its module when it is first called and
  calls the module's current attribute (so a test's monkeypatch of the module applies).
* `lazy_exports("isoconv.models", {"build_model": "isoconv.models.registry", ...})`: a package's `__getattr__`
  and `__dir__` (PEP 562), for a package whose public names live in heavy submodules.

tests/test_architecture.py reads the isoconv modules named in these calls as imports: they must point down the
layers like any other, and they take part in the circle check. tests/test_startup.py checks what is imported.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


class LazyModule:
    """Stands in for module `name` until an attribute is read; then imports it (once) and forwards."""

    def __init__(self, name: str) -> None:
        self._lazy_name = name
        self._lazy_module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._lazy_module is None:
            self._lazy_module = importlib.import_module(self._lazy_name)
        return getattr(self._lazy_module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}{' (imported)' if self._lazy_module is not None else ''}>"


def lazy_module(name: str) -> LazyModule:
    return LazyModule(name)


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported at the first call"
    return call


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__, __dir__ = lazy_exports(__name__, {name: module})` in a package's __init__.py."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(importlib.import_module(package), name, value)  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
