"""Placeholder: filled in below."""

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace, command: str) -> int:
    raise SystemExit("not yet")
