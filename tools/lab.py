#!/usr/bin/env python3
"""The udpmux network lab's command line: build, inspect or remove a lab by hand.

    python3 tools/lab.py up [--prefix P] [--symmetric in,out]   # prefix default: udpmux-cli
    python3 tools/lab.py status                                 # every lab on this machine
    python3 tools/lab.py down [--prefix P] | --stale            # --stale: labs whose building
                                                                # process is gone
    ip netns exec udpmux-cli-inside bash                        # then work inside a host

The lab itself (its topology, addresses, counters and teardown) is the library tests/lab.py,
which the tests use; read its docstring. This file only parses arguments and prints.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/ goes first even if it is already on the path: this script's own directory (tools/)
# is sys.path[0], and `import lab` there would find this file instead of the library.
sys.path.insert(0, os.path.join(ROOT, "tests"))

from lab import Lab, LabError, _tool, list_labs, stale_prefixes     # noqa: E402

CLI_PREFIX = "udpmux-cli"


def _status():
    labs = list_labs()
    if not labs:
        print("no lab namespaces")
        return
    stale = set(stale_prefixes())
    ip = _tool("ip")
    for prefix, hosts in labs.items():
        print("lab %s%s" % (prefix, "  (stale: its process is gone)" if prefix in stale else ""))
        for host in hosts:
            ns = "%s-%s" % (prefix, host)
            res = subprocess.run([ip, "-n", ns, "-j", "-4", "addr"], capture_output=True,
                                 text=True, timeout=30)
            addrs = []
            if res.returncode == 0:
                for link in json.loads(res.stdout or "[]"):
                    for a in link.get("addr_info", []):
                        if link.get("ifname") != "lo":
                            addrs.append("%s %s/%s" % (link["ifname"], a["local"],
                                                       a["prefixlen"]))
            print("  %-8s %-28s %s" % (host, ns, ", ".join(addrs)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/lab.py", description=(
        "Build, inspect or remove the udpmux network lab (network namespaces)."))
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build a lab and leave it running")
    p_up.add_argument("--prefix", default=CLI_PREFIX)
    p_up.add_argument("--symmetric", default="", help="comma list of NAT sides: in,out")
    p_down = sub.add_parser("down", help="remove a lab (stopping processes left in it)")
    p_down.add_argument("--prefix", default=CLI_PREFIX)
    p_down.add_argument("--stale", action="store_true",
                        help="remove every automatically named lab whose process is gone")
    sub.add_parser("status", help="list the labs on this machine")
    args = parser.parse_args(argv)

    if args.cmd == "status":
        _status()
        return 0
    reason = Lab.unavailable()
    if reason:
        print("lab: " + reason, file=sys.stderr)
        return 2
    try:
        if args.cmd == "up":
            sides = [s for s in args.symmetric.split(",") if s]
            lab = Lab(prefix=args.prefix, symmetric=sides, register_atexit=False).up()
            print(lab.describe())
            print("build %.3f s; enter a host with: ip netns exec %s bash"
                  % (lab.build_seconds, lab.ns("inside")))
        elif args.stale:
            for prefix in stale_prefixes():
                Lab(prefix=prefix, register_atexit=False).down()
                print("removed stale lab %s" % prefix)
        else:
            lab = Lab(prefix=args.prefix, register_atexit=False)
            lab.down()
            print("lab %s removed" % args.prefix)
    except (LabError, ValueError) as e:
        print("lab: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
