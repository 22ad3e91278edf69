"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem with the user's input (path, file, option, server) and how to fix it.

    The CLI prints the message on one line and exits with status 2, without a traceback.
    The message must name the offending file, option or server and say what to do.
    """


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages, logs and run tags."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url
