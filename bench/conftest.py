"""The benchmarks run in one process: the test suite's ``-n 2`` (pyproject's addopts) would run
them under pytest-xdist, where pytest-benchmark disables itself and measures nothing."""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    config.option.numprocesses = 0  # before pytest-xdist reads it
