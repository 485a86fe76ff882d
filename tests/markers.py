"""Skip markers shared by test modules (imported by name: tests/ is on sys.path, as serving_helpers is)."""

from __future__ import annotations

import pytest

from quantizer.execution.openvino import openvino_unavailable

# OpenVINO is a regular dependency; a wheel-less platform skips its tests with the reason the backend gives
needs_openvino = pytest.mark.skipif(openvino_unavailable() is not None, reason=str(openvino_unavailable()))
