"""Built-in rules. Importing this package registers them in the default registry."""
from . import layers, ops, structure, transformer  # noqa: F401

__all__ = ["layers", "ops", "structure", "transformer"]
