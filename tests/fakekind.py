"""A master running workers that misbehave on purpose, for tests/test_master.py.

    python tests/fakekind.py boot-fails|crashes|stubborn

boot-fails  the worker cannot start (BootError): the master must not respawn it
setup-raises the worker's setup fails with any other exception (a damaged table): the
            same, a boot error
crashes     the worker dies of an exception a moment after it is ready: respawn, backoff
stubborn    the worker ignores MSG_STOP and SIGTERM: the master kills it at the deadline
unbuildable the first worker runs; making the next one fails in the master (a bug in the
            kind, or no memory): the master logs it and tries again later
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udpmux.log import setup  # noqa: E402
from udpmux.master import Master  # noqa: E402
from udpmux.worker import BootError, Worker  # noqa: E402


class TunnelConfig:
    def __init__(self, name):
        self.name = name

    def endpoints(self):
        return {"public": (2, ("127.0.0.1", 0), 2)}       # AF_INET, SOCK_DGRAM


class Config:
    def __init__(self):
        self.tunnels = {"only": TunnelConfig("only")}
        self.stop_timeout = 1.5


class BootFails(Worker):
    def setup(self):
        raise BootError("the fake resource is missing")


class SetupRaises(Worker):
    def setup(self):
        raise RuntimeError("tag table header is damaged, on purpose")


class Crashes(Worker):
    def setup(self):
        self.born = time.monotonic()

    def tick(self, now):
        if now - self.born > 0.2:
            raise RuntimeError("a bug, on purpose")


class Stubborn(Worker):
    def setup(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stop(self, deadline, final=True):
        pass                            # never stops by itself


class Kind:
    def __init__(self, worker_class, builds=None):
        self.worker_class = worker_class
        self.builds = builds            # workers it can make, then it fails; None: any


    def load(self):
        return Config()

    def shared(self, config, old):
        return None

    def worker(self, tunnel, pipe, inherited, log):
        if self.builds is not None:
            if self.builds == 0:
                raise RuntimeError("the fake kind cannot make a worker")
            self.builds -= 1
        return self.worker_class(tunnel.name, pipe, inherited, log)

    def traffic(self, tunnels):
        return 0, 0


if __name__ == "__main__":
    kinds = {"boot-fails": Kind(BootFails), "setup-raises": Kind(SetupRaises),
             "crashes": Kind(Crashes),
             "stubborn": Kind(Stubborn), "unbuildable": Kind(Worker, builds=1)}
    log = setup(debug=True)
    sys.exit(Master(kinds[sys.argv[1]], log).run())
