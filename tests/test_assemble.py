"""Assembling streamed chunks into a non-stream completion (pure; no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.assemble import StreamAssembler, combine_choice_usage
from worker.errors import StreamInterrupted

META = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1767225600, "model": "kimi-k2.5"}
USAGE = {"prompt_tokens": 82, "completion_tokens": 31, "total_tokens": 113, "cached_tokens": 64}


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**META, "choices": list(choices), **extra}


def ch(delta: dict[str, Any], index: int = 0, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish, **extra}


def assemble(chunks: list[dict[str, Any]]) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    asm = StreamAssembler()
    published = [d for c in chunks for d in asm.feed(c)]
    return asm.finish(), published


def test_tool_call_stream_from_the_docs() -> None:
    # docs/moonshot-api.md §12, verbatim shapes.
    result, published = assemble(
        [
            chunk(ch({"role": "assistant", "content": ""})),
            chunk(ch({"reasoning_content": "User wants weather; "})),
            chunk(ch({"reasoning_content": "call get_weather."})),
            chunk(
                ch(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "get_weather:0",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ]
                    }
                )
            ),
            chunk(ch({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})),
            chunk(ch({"tool_calls": [{"index": 0, "function": {"arguments": '"Beijing"}'}}]})),
            chunk(ch({}, finish="tool_calls", usage=USAGE)),
            chunk(usage=USAGE),
        ]
    )
    msg = result["choices"][0]["message"]
    assert msg["content"] == ""
    assert msg["reasoning_content"] == "User wants weather; call get_weather."
    assert msg["tool_calls"] == [
        {
            "id": "get_weather:0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
        }
    ]
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert result["usage"] == USAGE
    assert result["id"] == "cmpl-1" and result["object"] == "chat.completion" and result["model"] == "kimi-k2.5"
    assert len(published) == 6  # the empty final delta is not published


@pytest.mark.parametrize(
    ("chunks", "usage"),
    [
        ([chunk(ch({"content": "hi"})), chunk(ch({}, finish="stop", usage=USAGE))], USAGE),  # Moonshot: choice-level
        ([chunk(ch({"content": "hi"})), chunk(ch({}, finish="stop")), chunk(usage=USAGE)], USAGE),  # OpenAI: trailing
        ([chunk(ch({"content": "hi"}), usage=None), chunk(ch({}, finish="stop"), usage=None)], None),  # none
    ],
    ids=["choice-level", "top-level", "absent"],
)
def test_usage_from_either_placement(chunks: list[dict[str, Any]], usage: dict[str, Any] | None) -> None:
    result, _ = assemble(chunks)
    assert result.get("usage") == usage


def test_several_choices_and_parallel_tool_calls() -> None:
    u0 = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    u1 = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    result, _ = assemble(
        [
            chunk(
                ch({"content": "a"}, 0),
                ch(
                    {
                        "tool_calls": [
                            {"index": 0, "id": "x:0", "function": {"name": "x"}},
                            {"index": 1, "id": "y:1", "function": {"name": "y"}},
                        ]
                    },
                    1,
                ),
            ),
            chunk(ch({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}, 1)),
            chunk(ch({}, 0, "stop", usage=u0), ch({}, 1, "tool_calls", usage=u1)),
        ]
    )
    assert [c["index"] for c in result["choices"]] == [0, 1]
    calls = result["choices"][1]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["x", "y"] and calls[1]["function"]["arguments"] == "{}"
    assert result["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}


def test_unknown_fields_are_kept() -> None:
    result, _ = assemble(
        [
            chunk(ch({"content": "x", "new_field": {"a": 1}}), system_fingerprint="fp_1"),
            chunk(ch({}, finish="stop")),
        ]
    )
    assert result["system_fingerprint"] == "fp_1"
    assert result["choices"][0]["message"]["new_field"] == {"a": 1}


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [chunk(ch({"content": "cut"}))],
        [chunk(ch({"content": "a"}, 0), ch({"content": "b"}, 1)), chunk(ch({}, 0, "stop"))],
    ],
    ids=["no-choices", "no-finish-reason", "one-choice-unfinished"],
)
def test_incomplete_streams_are_errors_not_results(chunks: list[dict[str, Any]]) -> None:
    with pytest.raises(StreamInterrupted):
        assemble(chunks)


@pytest.mark.parametrize("bad", [[1, 2], "text", {"choices": "nope"}, {"choices": [3]}])
def test_undecodable_chunks_raise(bad: Any) -> None:
    with pytest.raises(StreamInterrupted):
        StreamAssembler().feed(bad)


def test_combine_single_choice_is_identity() -> None:
    assert combine_choice_usage([USAGE]) == USAGE
