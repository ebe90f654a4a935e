"""Errors a user can fix. The CLI prints these as one line instead of a traceback."""

from __future__ import annotations


class OnpolicyUserError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


_USER_ERROR_TYPES: list[type[BaseException]] = [OnpolicyUserError]


def register_user_error(cls: type[BaseException]) -> type[BaseException]:
    _USER_ERROR_TYPES.append(cls)
    return cls


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, tuple(_USER_ERROR_TYPES))
