"""Shared pytest fixtures for udpmux.

`lab` builds the network-namespace lab of tests/lab.py for one test and always tears it down
(build ~0.05 s, teardown ~0.01 s here, so every test gets a fresh one). Without root, iproute2,
nftables, conntrack or the right to create network namespaces, tests using it are skipped with
the reason; with UDPMUX_REQUIRE_LAB=1 (set by CI) they fail instead, so CI never skips the lab
silently. `lab_factory` builds extra labs (a second lab, or build-time options such as
Lab(symmetric=("in",))) and removes them after the test.  `delay` is for tests that also
call lab.set_delay(): it skips (fails under UDPMUX_REQUIRE_LAB=1) when the delay line cannot
be built or run here.
"""

import functools
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))      # makes the in-tree udpmux importable

import lab as lablib      # noqa: E402


@functools.lru_cache(maxsize=None)
def _lab_unavailable():
    return lablib.Lab.unavailable()


def _lab_required():
    return os.environ.get("UDPMUX_REQUIRE_LAB") == "1"


@functools.lru_cache(maxsize=None)
def _reap_stale_labs():
    # Labs left behind by a test process that died (SIGKILL, power loss) are named after its
    # PID; remove those whose process is gone. Live labs of other runs are left alone.
    for prefix in lablib.stale_prefixes():
        try:
            lablib.Lab(prefix=prefix, register_atexit=False).down()
        except lablib.LabError as e:
            print("could not remove stale lab %s: %s" % (prefix, e), file=sys.stderr)


def _require_lab():
    reason = _lab_unavailable()
    if reason:
        if _lab_required():
            pytest.fail("UDPMUX_REQUIRE_LAB=1 but " + reason, pytrace=False)
        pytest.skip(reason)
    _reap_stale_labs()


@functools.lru_cache(maxsize=None)
def _delay_unavailable():
    return lablib.delay_unavailable()


@pytest.fixture
def delay():
    """The lab's delay line can run here (Lab.set_delay); request it beside `lab`."""
    reason = _lab_unavailable() or _delay_unavailable()
    if reason:
        if _lab_required():
            pytest.fail("UDPMUX_REQUIRE_LAB=1 but " + reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def lab():
    """A freshly built network lab (see tests/lab.py), removed after the test."""
    _require_lab()
    the_lab = lablib.Lab()
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def lab_factory():
    """make(**Lab_kwargs) -> a built Lab; every lab made is removed after the test. For tests
    that need a second lab, a build-time option (symmetric=("in",)) or to test teardown."""
    _require_lab()
    made = []

    def make(**kwargs):
        new = lablib.Lab(**kwargs)
        made.append(new)
        return new.up()

    yield make
    errors = []
    for each in made:
        try:
            each.down()
        except lablib.LabError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("lab teardown failed: " + "; ".join(errors), pytrace=False)
