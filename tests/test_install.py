"""The install route that README.md and "Running under systemd" in udpmux(8) give, for
real: tools/install puts udpmux in a virtual environment (/opt/udpmux), links the command
where every unit's ExecStart= runs it (/usr/local/bin/udpmux) and the man pages where
man(1) and the units' Documentation= find them (/usr/local/share/man).

Here it installs into a temporary directory that stands in for all three, from a copy of
this tree, under a umask of 077 that root may have.  Like the documented route it fetches
the dependencies from the package index: where the index cannot be reached the tests
that need the installation skip and say so.  The units' own checks (systemd-analyze
verify, hardening, the uot units' command lines) are in tests/test_ops.py.
"""

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import types

import pytest

from procs import ROOT
from udpmux import __version__

INSTALL = os.path.join(ROOT, "tools", "install")
UNIT_DIR = os.path.join(ROOT, "conf", "systemd")
# Where the documents say the route puts things; tools/install's defaults must agree.
PREFIX = "/opt/udpmux"
BINDIR = "/usr/local/bin"
MANDIR = "/usr/local/share/man"
INSTALL_TIME = 600      # seconds: a fresh venv, and the build and its dependencies fetched
# pip's words when it cannot get a requirement: no network, no DNS, no proxy, or an
# index (a local mirror) without it.
UNREACHABLE = re.compile(r"No matching distribution found for \S+|NewConnectionError|"
                         r"ConnectTimeoutError|ProxyError|Temporary failure in name resolution|"
                         r"Network is unreachable|No route to host|Name or service not known")


def clean_env():
    """The environment without what points Python at this checkout or another venv."""
    e = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET"):
        e.pop(name, None)
    return e


def units():
    return sorted(name for name in os.listdir(UNIT_DIR) if name.endswith(".service"))


def exec_program(name):
    with open(os.path.join(UNIT_DIR, name)) as f:
        (line,) = [line for line in f if line.startswith("ExecStart=")]
    return line[len("ExecStart="):].split()[0]


def documented_in_the_man_page():
    with open(os.path.join(ROOT, "man", "udpmux.8")) as f:
        text = f.read()
    return text.split(".Ss Running under systemd\n", 1)[1].split("\n.Ss ", 1)[0]


# -- the documents, the script and the units agree (no installation needed)

def test_tools_install_defaults_are_the_documented_places():
    with open(INSTALL) as f:
        script = f.read()
    assert os.access(INSTALL, os.X_OK), "tools/install is not executable"
    defaults = dict(re.findall(r"^(\w+)=\$\{\d:-([^}]+)\}$", script, re.M))
    assert defaults == {"prefix": PREFIX, "bindir": BINDIR, "mandir": MANDIR}


@pytest.mark.parametrize("name", units())
def test_every_unit_runs_udpmux_where_tools_install_links_it(name):
    assert exec_program(name) == f"{BINDIR}/udpmux", \
        f"{name}: ExecStart= runs {exec_program(name)}, the install links {BINDIR}/udpmux"


@pytest.mark.parametrize("document", ["README.md", "man/udpmux.8"])
def test_the_documents_give_the_route_and_its_places(document):
    if document == "README.md":
        with open(os.path.join(ROOT, document)) as f:
            text = f.read()
    else:
        text = documented_in_the_man_page()
    for needed in ("tools/install", PREFIX, f"{BINDIR}/udpmux", MANDIR):
        assert needed in text, f"{document} does not mention {needed}"


# -- the installation, for real

@pytest.fixture(scope="module")
def installed():
    """tools/install run into a temporary directory, from a copy of this tree (building
    writes into the source tree): the directories it used, as PREFIX, BINDIR, MANDIR."""
    top = tempfile.mkdtemp(prefix="udpmux-install-")
    try:
        os.chmod(top, 0o755)        # others reach it, as everyone reaches /opt
        source = os.path.join(top, "source")
        shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".hypothesis",
            ".pytest_cache"))
        where = types.SimpleNamespace(prefix=os.path.join(top, "opt", "udpmux"),
                                      bindir=os.path.join(top, "bin"),
                                      mandir=os.path.join(top, "man"))
        # The script sets the umask it needs; a strict one here must not matter.
        out = subprocess.run(["sh", "-c", 'umask 077 && exec "$0" "$@"',
                              os.path.join(source, "tools", "install"),
                              where.prefix, where.bindir, where.mandir],
                             env=clean_env(), cwd=top, capture_output=True, text=True,
                             timeout=INSTALL_TIME)
        output = out.stdout + out.stderr
        if out.returncode != 0:
            unreachable = UNREACHABLE.search(output)
            if unreachable:
                pytest.skip("tools/install cannot get udpmux's dependencies from the "
                            f"package index here: {unreachable.group()}")
            raise AssertionError(f"tools/install failed ({out.returncode}):\n{output}")
        assert f"installed udpmux {__version__} in {where.prefix}" in output, output
        yield where
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run(argv, **kwargs):
    return subprocess.run(argv, env=clean_env(), cwd="/", capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_the_link_runs_the_installed_udpmux(installed):
    link = os.path.join(installed.bindir, "udpmux")
    assert os.readlink(link) == os.path.join(installed.prefix, "bin", "udpmux")
    version = run([link, "--version"])
    assert (version.returncode, version.stdout) == (0, f"udpmux {__version__}\n"), version
    usage = run([link, "--help"])
    assert usage.returncode == 0 and "Usage:" in usage.stdout, usage
    for mode in ("relay", "expose", "punch", "uot-server", "uot-client"):
        assert f"udpmux {mode} " in usage.stdout, f"--help lists no {mode}"
    # The copy in the prefix, not this checkout, is what runs.
    where = run([os.path.join(installed.prefix, "bin", "python"), "-c",
                 "import udpmux; print(udpmux.__file__)"])
    assert where.stdout.startswith(installed.prefix + os.sep), where


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="needs root: runs the installed udpmux as another user, as the "
                           "units run it as the user udpmux")
@pytest.mark.skipif(shutil.which("setpriv") is None,
                    reason="setpriv is not installed (apt-get install util-linux)")
def test_an_unprivileged_user_runs_what_root_installed(installed):
    nobody = pwd.getpwnam("nobody")
    out = run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
               "--clear-groups", os.path.join(installed.bindir, "udpmux"), "--version"])
    assert (out.returncode, out.stdout) == (0, f"udpmux {__version__}\n"), out.stderr


def test_the_installation_carries_the_units_and_the_examples(installed):
    shipped = os.path.join(installed.prefix, "share", "udpmux", "systemd")
    assert sorted(os.listdir(shipped)) == sorted(os.listdir(UNIT_DIR))
    for name in os.listdir(UNIT_DIR):
        with open(os.path.join(UNIT_DIR, name)) as a, open(os.path.join(shipped, name)) as b:
            assert a.read() == b.read(), f"the installed {name} differs from conf/systemd's"
    examples = os.path.join(installed.prefix, "share", "doc", "udpmux", "examples")
    conf = os.path.join(ROOT, "conf")
    assert sorted(os.listdir(examples)) == sorted(
        name for name in os.listdir(conf) if os.path.isfile(os.path.join(conf, name)))


def test_every_manual_the_units_name_is_where_man_finds_it(installed):
    named = set()
    for name in units():
        with open(os.path.join(UNIT_DIR, name)) as f:
            named |= set(re.findall(r"man:([\w.-]+)\((\d)\)", f.read()))
    assert ("udpmux", "8") in named
    for page, section in sorted(named):
        path = os.path.join(installed.mandir, f"man{section}", f"{page}.{section}")
        assert os.path.isfile(path), f"man:{page}({section}) is not under {installed.mandir}"
    if shutil.which("man"):
        for page, section in sorted(named):
            out = run(["man", "-M", installed.mandir, "-w", section, page])
            assert out.returncode == 0, f"man -w {section} {page}: {out.stderr}"
