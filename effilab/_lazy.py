"""Lazy attributes for packages whose members import fastai (seconds): loaded on first use."""

from __future__ import annotations

from importlib import import_module


def lazy_attributes(package: str, namespace: dict, names: dict[str, str]):
    """`__getattr__` and `__dir__` for `package` that import `names[attr]` (a module path) on first use;
    a name mapped to its own module path is the module itself."""

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = import_module(names[name])
        value = module if names[name].endswith("." + name) else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
