"""The `glm4` command line. main(argv) -> exit code, so tests can call it."""

from __future__ import annotations

import argparse
import sys

import glm4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4", description="Run GLM-4-0414 models.")
    parser.add_argument("--version", action="version", version=f"glm4 {glm4.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
