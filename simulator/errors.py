"""Moonshot-shaped API errors.

Every failure the simulator reports is an ``ApiError``; the HTTP layer turns it into the compact
body ``{"error":{"message":...,"type":...}}`` the real API sends (docs/moonshot-api.md §7).
"""

from __future__ import annotations

import json

JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class ApiError(Exception):
    """An error response: HTTP status, Moonshot error ``type`` and message."""

    content_type = JSON_CONTENT_TYPE

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


# Placeholders for the account in rate-limit messages, where the real API names the org and key.
ORG = "org-sim"
ACCESS_KEY = "ak-sim"
_ACCOUNT = f"Your account {ORG}<{ACCESS_KEY}>"


def engine_overloaded() -> ApiError:
    return ApiError(429, "engine_overloaded_error", "The engine is currently overloaded, please try again later")


def rate_limited(limit: str, retry_after_s: int) -> ApiError:
    """429 for the concurrency and RPM axes; ``limit`` is e.g. ``"max RPM: 200"``.

    The delay lives only in the text: the real API sends no Retry-After header (docs/moonshot-api.md §1).
    """
    message = f"{_ACCOUNT} request reached organization {limit}, please try again after {retry_after_s} seconds"
    return ApiError(429, "rate_limit_reached_error", message)


def tpm_limited(current: int, limit: int) -> ApiError:
    return ApiError(
        429, "rate_limit_reached_error", f"{_ACCOUNT} request reached TPM rate limit, current:{current}, limit:{limit}"
    )


def quota_exceeded() -> ApiError:
    message = f"You exceeded your current token quota: <{ORG}> 0.0, please check your account balance"
    return ApiError(429, "exceeded_current_quota_error", message)


def server_error() -> ApiError:
    # §7 documents only file-extraction texts for server_error; a generic one suits a chat request.
    return ApiError(500, "server_error", "Internal server error, please try again later")


class EdgeError(ApiError):
    """A failure answered by the edge proxy in front of the API: plain text, not the API's JSON."""

    content_type = "text/plain"

    def body(self) -> bytes:
        return self.message.encode()


def edge_unavailable() -> EdgeError:
    # Envoy's wording when no upstream answers; 502/503/504 from the edge are plausible (§7).
    return EdgeError(503, "", "upstream connect error or disconnect/reset before headers. reset reason: overflow")
