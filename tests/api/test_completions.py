"""POST /v1/completions (raw text completion) through Flask's test client on the scripted engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pureapi.api.completions import Completion
from pureapi.app import create_app
from pureapi.engines.remote import RemoteEngine
from pureapi.settings import Settings

from ..conftest import FakeApp, MakeFakeApp
from ..sse import sse_data


def complete(fake: FakeApp, **body: object):  # type: ignore[no-untyped-def]
    body.setdefault("prompt", "Once upon a time")
    return fake.client.post("/v1/completions", json=body)


def test_shape_usage_and_raw_prompt(fake: FakeApp) -> None:
    fake.engine.enqueue("there was a cat")
    r = complete(fake, model="anything")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"] == [{"text": "there was a cat", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens"] == 4  # one fake token per word, and no chat template around them
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["total_tokens"] == 8
    assert fake.engine.texts == ["Once upon a time"] and fake.engine.prompts == []  # never encode_chat
    assert Completion.model_validate(body).model_dump() == body


def test_max_tokens_defaults_to_16_as_openai_does(fake: FakeApp) -> None:
    fake.engine.enqueue(" ".join(["w"] * 40))
    body = complete(fake).get_json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    fake.engine.enqueue(" ".join(["w"] * 40))
    assert complete(fake, max_tokens=None).get_json()["usage"]["completion_tokens"] == 40  # null: the context


def test_token_id_prompts_go_to_the_engine_as_they_are(fake: FakeApp) -> None:
    ids = fake.engine.encode_text("hello big world")
    for prompt in (ids, [ids]):
        r = complete(fake, prompt=prompt, max_tokens=10)
        assert r.status_code == 200
        assert r.get_json()["choices"][0]["text"] == "You said: hello big world"  # the fake echoes its prompt
        assert r.get_json()["usage"]["prompt_tokens"] == 3


def test_sampling_fields_and_stop_strings(fake: FakeApp) -> None:
    fake.engine.enqueue("one two STOP three")
    body = {"temperature": 0.5, "top_p": 0.9, "top_k": 7, "seed": 3, "stop": ["STOP"], "frequency_penalty": 0.5}
    r = complete(fake, **body, user="me")
    assert r.get_json()["choices"][0]["text"] == "one two "
    p = fake.engine.params[0]
    assert (p.temperature, p.top_p, p.top_k, p.seed, list(p.stop), p.frequency_penalty) == (
        0.5,
        0.9,
        7,
        3,
        ["STOP"],
        0.5,
    )


def test_streaming_events_then_usage_then_done(fake: FakeApp) -> None:
    fake.engine.enqueue("x y z")
    r = complete(fake, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    data = sse_data(r)
    assert data[-1] == "[DONE]"
    events = [Completion.model_validate_json(d) for d in data[:-1]]
    assert all(e.object == "text_completion" for e in events)
    assert "".join(e.choices[0].text for e in events if e.choices) == "x y z"
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "stop"
    assert events[-1].choices == [] and events[-1].usage is not None and events[-1].usage.completion_tokens == 3
    assert all(e.usage is None for e in events[:-1])


def test_mid_stream_failure_is_an_error_event_then_done(fake: FakeApp) -> None:
    fake.engine.enqueue(RuntimeError("boom"))
    data = sse_data(complete(fake, stream=True))
    assert data[-1] == "[DONE]" and "error" in json.loads(data[-2])


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"echo": True}, "echo", "echo"),
        ({"suffix": "end"}, "suffix", "suffix"),
        ({"logprobs": -1}, "logprobs", ""),
        ({"logprobs": 21}, "logprobs", ""),
        ({"best_of": 2}, "best_of", ""),
        ({"n": 2}, "n", ""),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "logit_bias"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
        ({"prompt": [[1], [2]]}, "prompt", "one prompt"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [1, "a"]}, "prompt", ""),
        ({"prompt": [-1]}, "prompt", "vocabulary"),
        ({"prompt": None}, "prompt", ""),
        ({"max_tokens": 0}, "max_tokens", ""),
        ({"temperature": 3}, "temperature", ""),
        ({"stop": ["s"] * 17}, "stop", ""),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "not a supported field"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not a supported field"),
        ({"guided_json": {}}, "guided_json", "not a supported field"),
    ],
)
def test_unsupported_or_bad_fields_are_a_400_naming_them(
    fake: FakeApp, body: dict[str, object], param: str, words: str
) -> None:
    r = complete(fake, **body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"].split(".")[0] == param and words in error["message"]
    assert fake.engine.params == []  # nothing reached the engine


def test_logprobs_in_openais_legacy_shape_streamed_and_not(fake: FakeApp) -> None:
    fake.engine.enqueue("there was a cat")
    body = complete(fake, logprobs=2).get_json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["there ", "was ", "a ", "cat"] and len(lp["token_logprobs"]) == 4
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(top) == 2 for top in lp["top_logprobs"])
    assert lp["text_offset"] == [0, 6, 10, 12]  # where each token starts in the completion's text
    assert fake.engine.params[-1].logprobs == 2
    fake.engine.enqueue("there was a cat")
    events = [json.loads(d) for d in sse_data(complete(fake, logprobs=0, stream=True))[:-1]]
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["text"]]
    assert [t for lp in streamed for t in lp["tokens"]] == ["there ", "was ", "a ", "cat"]
    assert [o for lp in streamed for o in lp["text_offset"]] == [0, 6, 10, 12]
    assert all(top == {} for lp in streamed for top in lp["top_logprobs"])
    fake.engine.enqueue("fine")
    assert complete(fake).get_json()["choices"][0]["logprobs"] is None  # only when asked


def test_the_defaults_of_refused_fields_are_accepted(fake: FakeApp) -> None:
    fake.engine.enqueue("fine")
    r = complete(fake, echo=False, suffix=None, logprobs=None, best_of=1, n=1, logit_bias={}, user="u")
    assert r.status_code == 200, r.get_data(as_text=True)


def test_a_prompt_longer_than_the_context_is_a_400(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app(context_length=8)
    r = complete(fake, prompt="a b c d e f g h i")
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "prompt"
    r = complete(fake, prompt="a b c", max_tokens=6)
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "max_tokens"


def test_the_remote_engine_refuses_raw_prompts(tmp_path: Path) -> None:
    """It forwards chat messages only: a clear 400, not a 500 from the upstream call."""
    engine = RemoteEngine("http://127.0.0.1:9", model="upstream-model")
    app = create_app(Settings(engine="remote", db=tmp_path / "r.db"), engine=engine)
    for prompt in ("text", [1, 2, 3]):
        r = app.test_client().post("/v1/completions", json={"prompt": prompt})
        assert r.status_code == 400, r.get_data(as_text=True)
        assert r.get_json()["error"]["param"] == "prompt" and "/v1/chat/completions" in r.get_json()["error"]["message"]
    app.extensions["pureapi"].store.close()
