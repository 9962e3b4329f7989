"""The live attach handles of every optimizer (grad-mode and length-mode alike), so a second
``attach`` to the same optimizer is refused and ``remove()`` forgets the handle."""
from __future__ import annotations

import weakref

import torch

#: optimizer -> its live handles
HANDLES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list]" = weakref.WeakKeyDictionary()
