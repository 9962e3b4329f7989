"""Built-in rules. Importing this package registers them in the default registry."""
from . import activations, compose, layers, ops, structure, transformer  # noqa: F401

__all__ = ["activations", "compose", "layers", "ops", "structure", "transformer"]
