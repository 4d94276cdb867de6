"""``python -m bench.scale {operator,background,router} ...``: the scale benchmarks of issue 14."""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    sub = parser.add_subparsers(dest="part", required=True)
    from bench.scale import background, operator, router_bench

    operator.add_arguments(sub.add_parser("operator", help="N ModelGroups on a kwok cluster: writes, reconciles, RSS"))
    background.add_arguments(sub.add_parser("background", help="requests/s the router sends to idle emulated pods"))
    router_bench.add_arguments(
        sub.add_parser("router", help="decision time, background traffic, throughput, restart; writes scale.json")
    )
    args = parser.parse_args(argv)
    command = "python -m bench.scale " + shlex.join(argv)
    if args.part == "operator":
        return operator.main(args, command)
    if args.part == "router":
        return router_bench.main(args, command)
    return background.main(args, command)


if __name__ == "__main__":
    sys.exit(main())
