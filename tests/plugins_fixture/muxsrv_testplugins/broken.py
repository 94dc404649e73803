"""A plugin module whose import fails: the error must name this module."""

import muxsrv_testplugins_missing_dependency  # noqa: F401

echo = None
