"""Tests of the system-centric telemetry writers, with the host-read spy they use."""

from __future__ import annotations

from ..spies import EFFILAB_DIR, HOST_READS, HostReadSpy  # noqa: F401  (used by the tests here)
