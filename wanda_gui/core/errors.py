"""The one exception type whose message is meant for the user, not for a traceback."""


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix; the message says how."""
