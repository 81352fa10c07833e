"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Bad input from the user: the CLI prints the message alone, without a traceback.

    The message names the file, line, field or value at fault and says how to fix it.
    """
