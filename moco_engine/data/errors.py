"""``DataError``: a data path or a data set the run cannot use, whatever the modality."""

from __future__ import annotations

from moco_engine.config.schema import UserError


class DataError(UserError):
    """A data path or data set the run cannot use (one line, exit 2, as every ``UserError``)."""

    def __init__(self, message: str):
        # A DataLoader worker's exception is raised again in the main process as the same type,
        # with the worker's whole traceback as its message; the last line is the original one.
        if message.startswith("Caught DataError in DataLoader worker"):
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)
