"""The server's one HTTP error type: a status code and a one-line reason, sent as ``{"error": reason}``."""

from __future__ import annotations


class ApiError(Exception):
    """An error the client caused or must know about; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
