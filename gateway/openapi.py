"""The gateway's OpenAPI 3.1 document, built from the same pydantic models that validate requests."""

from __future__ import annotations

from functools import cache
from typing import Any

from moonq.record import JobStatus
from moonq.request import ChatRequest
from moonq.wire import ChatCompletion, Event

REF = "#/components/schemas/{model}"


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (ChatRequest, ChatCompletion, Event):
        schema = model.model_json_schema(ref_template=REF, by_alias=True)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
            }
        },
    }
    schemas["JobAccepted"] = {
        "type": "object",
        "required": ["id", "status"],
        "properties": {"id": {"type": "string"}, "status": {"type": "string"}},
    }
    schemas["JobState"] = {
        "type": "object",
        "required": ["id", "status", "attempt"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": [status.value for status in JobStatus]},  # the record's, passed through
            "model": {"type": ["string", "null"]},
            "attempt": {"type": "integer"},
            "enqueued_at": {"type": "number"},
            "started_at": {"type": "number"},
            "finished_at": {"type": "number"},
            "result": {"$ref": REF.format(model="ChatCompletion")},
            "error": {"type": "object"},
        },
    }
    return schemas


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": "Moonshot error body", "content": _json("Error")} for code in codes}


JOB_ID = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
PRIORITY = {
    "name": "X-Moonq-Priority",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]$"},
}

BUILTIN_TOOLS = {
    "name": "X-Moonq-Builtin-Tools",
    "in": "header",
    "required": False,
    "description": "auto: the worker runs the round trips of builtin tools ($web_search) itself",
    "schema": {"type": "string", "enum": ["auto"]},
}


@cache
def openapi_document() -> dict[str, Any]:
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "moonq gateway", "version": "1"},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "summary": "A chat completion, through the queue (stream or not)",
                    "parameters": [IDEMPOTENCY, PRIORITY, BUILTIN_TOOLS],
                    "requestBody": {"required": True, "content": _json("ChatRequest")},
                    "responses": {
                        "200": {
                            "description": "completion, or an SSE stream of chunks",
                            "content": {**_json("ChatCompletion"), **sse},
                        },
                        **_errors(400, 401, 404, 409, 413, 429, 502),
                    },
                }
            },
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "parameters": [IDEMPOTENCY, PRIORITY, BUILTIN_TOOLS],
                    "requestBody": {"required": True, "content": _json("ChatRequest")},
                    "responses": {
                        "202": {"description": "accepted", "content": _json("JobAccepted")},
                        **_errors(400, 401, 413, 429),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "A job's state and result",
                    "parameters": JOB_ID,
                    "responses": {"200": {"description": "state", "content": _json("JobState")}, **_errors(401, 404)},
                },
                "delete": {
                    "summary": "Cancel a job",
                    "parameters": JOB_ID,
                    "responses": {
                        "200": {"description": "cancelled", "content": _json("JobAccepted")},
                        **_errors(401, 404, 409),
                    },
                },
            },
            "/v1/jobs/{job_id}/events": {
                "get": {
                    "summary": "The job's events as SSE (id = seq); Last-Event-ID resumes",
                    "parameters": [
                        *JOB_ID,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        },
                    ],
                    "responses": {"200": {"description": "events", "content": sse}, **_errors(400, 401, 404)},
                }
            },
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "ok"}}}},
        },
    }
