"""The HTTP gateway (``moonq gateway``): an OpenAI-compatible front door to the queue.

``POST /v1/chat/completions`` is served through the queue in the API's own shape, streamed or
not; ``/v1/jobs`` submits, reads, follows (SSE) and cancels jobs. It is a client of the SDK
(``producers.AsyncClient``) and never imports worker code.
"""
