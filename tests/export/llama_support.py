"""Skip marker for tests that need llama-cpp-python and llama.cpp's converter scripts (`make llama-cpp`)."""

from __future__ import annotations

import pytest

from slmops.errors import SlmopsError
from slmops.export import llamacpp


def llama_missing() -> str | None:
    """Why the llama.cpp tests cannot run here, or None when they can."""
    if not llamacpp.llama_cpp_available():
        return "llama-cpp-python is not installed (`make llama-cpp` builds it)"
    try:
        if llamacpp.find_converter_dir(required=False) is None:
            return "llama.cpp's converter scripts are not installed (`make llama-cpp`)"
    except SlmopsError as e:
        return str(e)
    return None


_WHY = llama_missing()
needs_llama = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
