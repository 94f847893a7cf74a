"""Test-suite set-up shared by every test directory.

Entry-point plug-ins are not auto-loaded in the test process (as pytest does for its own plug-ins with
PYTEST_DISABLE_PLUGIN_AUTOLOAD): a backend installed in the developer's environment must not change which
device the tests select. The plug-in tests turn autoload back on in subprocesses.
"""

from __future__ import annotations

import os

os.environ.setdefault("VBHAL_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.pop("VBHAL_DEVICE", None)
os.environ.pop("VBHAL_ENABLE", None)
os.environ.pop("ENABLE_VIRTUAL_BLACKWELL", None)

import pytest  # noqa: E402


@pytest.fixture
def fresh_hal():
    """A HAL probed anew for this test, forgotten afterwards."""
    from vbhal import hal

    hal.reset()
    yield hal.get_hal()
    hal.reset()
