"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, bad dataset).

    Entry points catch it and print ``error: <message>`` with exit status 2; everything else
    is a bug and keeps its traceback.
    """


def exit_status(action) -> int:
    """Run ``action()`` and return its exit status; a UserError prints one line and gives 2."""
    import sys
    try:
        return action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
