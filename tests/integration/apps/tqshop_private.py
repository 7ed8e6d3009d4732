"""An error class only the worker process imports: the caller cannot rebuild it."""


class PrivateError(Exception):
    pass
