"""The one exception type that reaches users as a plain message instead of a traceback."""


class TLFinetuneError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting.

    The message is a single paragraph that names the culprit (file, folder or value) and says
    what to do. The CLI prints it without a traceback and exits with status 2.
    """


class DataError(TLFinetuneError):
    """The images, folders or CSV files given as data cannot be used as they are."""


class WeightsError(TLFinetuneError):
    """Pretrained weights cannot be found, read or fitted to the chosen backbone."""


class ConfigError(TLFinetuneError):
    """A setting names something that does not exist or contradicts another setting."""
