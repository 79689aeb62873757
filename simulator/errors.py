"""Moonshot-shaped API errors.

Every failure the simulator reports is an ``ApiError``; the HTTP layer turns it into the compact
body ``{"error":{"message":...,"type":...}}`` the real API sends (MOONSHOT_API.md §7).
"""

from __future__ import annotations

import json

JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class ApiError(Exception):
    """An error response: HTTP status, Moonshot error ``type`` and message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message

    def body(self) -> bytes:
        """The compact JSON body, byte-for-byte like the real API's."""
        payload = {"error": {"message": self.message, "type": self.type}}
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def invalid_request(detail: str) -> ApiError:
    """400 with the ``Invalid request: {details}`` template most validation errors use."""
    return ApiError(400, "invalid_request_error", f"Invalid request: {detail}")


def rejected(message: str) -> ApiError:
    """400 whose live text carries no ``Invalid request:`` prefix (thinking/sampling rules)."""
    return ApiError(400, "invalid_request_error", message)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, "resource_not_found_error", f"Not found the model {model} or Permission denied")


def missing_auth() -> ApiError:
    return ApiError(401, "invalid_authentication_error", "Invalid Authentication")


def bad_api_key() -> ApiError:
    return ApiError(401, "incorrect_api_key_error", "Incorrect API key provided")
