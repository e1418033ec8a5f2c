"""Skip marker for tests that need llama-cpp-python and llama.cpp's converter scripts (`make llama-cpp`)."""

from __future__ import annotations

import pytest

from slmops.export.llamacpp import unavailable_reason as llama_missing

_WHY = llama_missing()
needs_llama = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

__all__ = ["llama_missing", "needs_llama"]
