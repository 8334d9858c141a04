"""The one exception type the CLI turns into a clean message and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (config, files, model, adapter).

    The message is one paragraph that names the key, file or tensor at fault and says how to fix it.
    The CLI prints it without a traceback and exits with code 2.
    """
