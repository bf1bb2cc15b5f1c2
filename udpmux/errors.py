"""Errors that end a command, and the exit status each one maps to.

Exit statuses follow sysexits(3), so that systemd's RestartPreventExitStatus=
and shell scripts can tell a bad command line from a bad configuration from a
network that went away.  The man page's EXIT STATUS section lists the same.
"""

EXIT_OK = 0
EXIT_FAILURE = 1        # the job ran and failed (a session could not deliver, the demo saw loss)
EXIT_USAGE = 64         # bad command line
EXIT_DATAERR = 65       # bad input data (a key file that is not a key, or not a regular file)
EXIT_NOINPUT = 66       # an input file is missing (a key file)
EXIT_SOFTWARE = 70      # an internal error (a bug: please report it)
EXIT_OSERR = 71         # the system refused: cannot bind, fork, map memory, write a file
EXIT_NOPERM = 77        # permission denied (a key file, a privileged port)
EXIT_CONFIG = 78        # bad configuration file

# A worker that cannot start exits with this status; the master then stops
# respawning it instead of looping (gunicorn's WORKER_BOOT_ERROR).
EXIT_WORKER_BOOT = 3

EXIT_NAMES = {
    EXIT_OK: "ok",
    EXIT_FAILURE: "failure",
    EXIT_USAGE: "usage",
    EXIT_DATAERR: "data",
    EXIT_NOINPUT: "no-input",
    EXIT_SOFTWARE: "software",
    EXIT_OSERR: "os",
    EXIT_NOPERM: "permission",
    EXIT_CONFIG: "config",
    EXIT_WORKER_BOOT: "worker-boot",
}


class Fatal(Exception):
    """An error that ends the command with a one-line message and an exit status."""

    status = EXIT_FAILURE

    def __init__(self, message, status=None):
        super().__init__(message)
        if status is not None:
            self.status = status


class UsageError(Fatal):
    status = EXIT_USAGE


class ConfigError(Fatal):
    """A configuration with problems: the first is the message, `problems` has them
    all (what `udpmux check` prints)."""

    status = EXIT_CONFIG

    def __init__(self, message, status=None, problems=None):
        super().__init__(message, status)
        self.problems = problems or [message]


class KeyFileError(Fatal):
    status = EXIT_DATAERR
