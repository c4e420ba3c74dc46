"""Errors that mean the user asked for something wrong: the CLI prints them as one line, never a stack trace."""


class UserError(Exception):
    """A mistake in what the user asked for (an unknown run, a missing argument, a bad input file)."""
