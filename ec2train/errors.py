"""The base of every error that is the user's to fix: the CLI prints it as one line and exits 2.

Import-free, because it ships inside the SageMaker model package with model.py.
"""


class UserError(ValueError):
    """Bad input, settings, files or environment; the message names the problem and the fix."""
