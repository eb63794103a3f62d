"""`python -m mixmo_dist.config --markdown > docs/CONFIG.md`: write the config reference (reference.markdown())."""

import argparse
import sys

from mixmo_dist.config.reference import markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixmo_dist.config",
        description="Print the config reference generated from the config dataclasses.",
    )
    parser.add_argument("--markdown", action="store_true", required=True, help="docs/CONFIG.md, on stdout")
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
