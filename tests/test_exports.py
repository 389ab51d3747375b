"""The package's top level exports every registered technique's callback."""

from __future__ import annotations

from effilab.registry import all_techniques


def test_every_technique_is_exported_at_the_top_level():
    """`from effilab import <Callback>` works for each registered technique (the package's lazy table)."""
    import effilab

    for name, technique in sorted(all_techniques().items()):
        cls = type(technique.make())
        assert cls.__name__ in effilab.__all__ and getattr(effilab, cls.__name__) is cls, name
