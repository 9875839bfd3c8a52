"""`flexmol retrieve`."""


def add_parser(sub, _sub) -> None:
    """Adds `flexmol retrieve` to the CLI's subparsers (`_sub` makes a subparser with the CLI's help style)."""
