"""udpmux: carry UDP and TCP flows through NAT, firewalls and lossy links."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (HERE / "udpmux" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="udpmux",
    version=VERSION,
    description="Carry UDP and TCP flows through NAT, firewalls and lossy links",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["udpmux", "udpmux.*"]),
    install_requires=["psutil", "docopt-ng", "xxhash", 'tomli; python_version < "3.11"'],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["udpmux = udpmux.cli:main"]},
    # Relative paths: pip puts them under the installation prefix.
    data_files=[
        ("share/man/man5", ["man/udpmux.conf.5"]),
        ("share/man/man7", ["man/udpmux-protocol.7"]),
        ("share/man/man8", ["man/udpmux.8"]),
        ("share/doc/udpmux/examples", ["conf/relay.toml", "conf/expose-wg.toml",
                                          "conf/punch-mosh.toml", "conf/uot-server-dns.toml",
                                          "conf/uot-client-dns.toml"]),
        ("share/udpmux/systemd", ["conf/systemd/udpmux-relay.service",
                                  "conf/systemd/udpmux-expose@.service",
                                  "conf/systemd/udpmux-punch@.service",
                                  "conf/systemd/udpmux-uot-server@.service",
                                  "conf/systemd/udpmux-uot-client@.service",
                                  "conf/systemd/udpmux.sysusers"]),
    ],
    classifiers=[
        "Environment :: No Input/Output (Daemon)",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: System :: Networking",
    ],
)
