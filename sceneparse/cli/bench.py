"""Placeholder: the owner of this command replaces it."""


def register(subparsers) -> None:
    pass
