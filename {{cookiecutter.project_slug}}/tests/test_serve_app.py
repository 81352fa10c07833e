"""The HTTP app in process, on a scripted engine: the wire format of every answer.

The engine is a stand-in that replays token ids, so each case is exact and fast; what
needs a real model or a real process (batching, seeds, signals, ports) is in
test_serve.py and test_serve_stop.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import build_tiny_tokenizer
from {{ cookiecutter.package_name }}.inference import SamplingParams
from {{ cookiecutter.package_name }}.serving.app import create_app
from {{ cookiecutter.package_name }}.serving.config import ServeConfig
from {{ cookiecutter.package_name }}.serving.engine import Engine, GenerationError, Submission
from {{ cookiecutter.package_name }}.serving.metrics import Metrics
from {{ cookiecutter.package_name }}.serving.runtime import Runtime

KEY = "in-process-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Step:
    """What the library would hand the engine: every token so far."""

    generated_tokens: list[int]
    finished: bool
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class Script:
    """What the scripted engine answers next: token ids in chunks, or a failure."""

    chunks: list[list[int]] = field(default_factory=list)
    error: str | None = None  # the library ends the request with this error
    refuse: bool = False  # submit() fails, as when the loop is stopping
    hold: bool = False  # never finishes (for disconnects)


class ScriptedEngine(Engine):
    def __init__(self, name: str, tokenizer, context_len: int = 64) -> None:
        eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        super().__init__(name, None, tokenizer, context_len, eos, None, source=f"/models/{name}")
        self.script = Script()
        self.submitted: list[tuple[list[int], SamplingParams]] = []
        self.cancelled: list[str] = []

    def start(self) -> None:
        pass

    def submit(self, prompt_ids: list[int], params: SamplingParams, matcher=None) -> Submission:
        if self.script.refuse:
            raise GenerationError("the engine is stopping and does not accept requests")
        self.submitted.append((list(prompt_ids), params))
        submission = Submission(f"{self.name}-{len(self.submitted)}", len(prompt_ids))
        loop = asyncio.get_running_loop()
        sent: list[int] = []
        chunks = [c[: params.max_tokens - len(sent)] for c in self.script.chunks]
        for index, chunk in enumerate(chunks):
            sent = sent + chunk
            last = index == len(chunks) - 1 and not self.script.hold and not self.script.error
            loop.call_soon(submission._queue.put_nowait, Step(list(sent), last))
        if self.script.error is not None:
            loop.call_soon(submission._queue.put_nowait, Step(sent, True, self.script.error))
        elif not chunks and not self.script.hold:
            loop.call_soon(submission._queue.put_nowait, Step([], True))
        return submission

    def cancel(self, submission: Submission) -> None:
        self.cancelled.append(submission.request_id)
        submission.finished = True

    def pending(self) -> int:
        return 0

    def fatal_error(self) -> str | None:
        return None


class ScriptedRuntime(Runtime):
    def __init__(self, config: ServeConfig, engines: dict[str, Engine]) -> None:
        super().__init__(config, Metrics(config.price.usd))
        self._scripted = engines

    def _load_engines(self) -> None:
        self.engines = self._scripted
        self.ready, self.phase = True, "ready"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def engine(tokenizer) -> ScriptedEngine:
    return ScriptedEngine("tiny", tokenizer)


@pytest.fixture
def app(engine, monkeypatch):
    monkeypatch.setenv("APP_TEST_KEY", KEY)
    config = ServeConfig.model_validate(
        {
            "model": {"name_or_path": "/models/tiny", "served_name": "tiny"},
            "server": {"api_key_env": "APP_TEST_KEY", "max_body_bytes": 4096},
            "limits": {"max_tokens_cap": 8, "max_tokens_default": 6, "max_stop_sequences": 2},
        }
    )
    runtime = ScriptedRuntime(config, {"tiny": engine})
    runtime._load_engines()
    return create_app(config, runtime)


@pytest.fixture
def client(app) -> Iterator[httpx.Client]:
    # The app's lifespan is not run: the scripted runtime is ready from the start.
    transport = httpx.ASGITransport(app=app)

    class Sync(httpx.Client):
        def request(self, method, url, **kwargs):
            async def call():
                async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                    response = await c.request(method, url, **kwargs)
                    await response.aread()
                    return response

            return asyncio.run(asyncio.wait_for(call(), 10))

    with Sync(base_url="http://app") as sync:
        yield sync


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def events(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def test_whole_chat_answer_has_the_text_usage_and_finish_reason(client, engine, tokenizer):
    answer = ids_of(tokenizer, "Hello there")
    engine.script = Script(chunks=[answer[:1], answer[1:] + engine.eos_ids])
    reply = client.post("/v1/chat/completions", json=CHAT, headers=AUTH).json()
    prompt = engine.submitted[0][0]
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    count = len(answer) + 1  # the end-of-turn token counts, and is not shown
    assert reply["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": count,
        "total_tokens": len(prompt) + count,
    }


def test_length_finish_when_the_token_limit_cuts_the_answer(client, engine, tokenizer):
    engine.script = Script(chunks=[ids_of(tokenizer, "one two three four five six seven")])
    body = {**CHAT, "max_tokens": 3}
    reply = client.post("/v1/chat/completions", json=body, headers=AUTH).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3
    assert engine.submitted[0][1].max_tokens == 3


def test_token_limit_defaults_and_is_capped(client, engine):
    client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10_000}, headers=AUTH)
    assert [params.max_tokens for _, params in engine.submitted] == [6, 8]


def test_stop_string_split_across_chunks_never_reaches_the_client(client, engine, tokenizer):
    text = ids_of(tokenizer, "abc END tail")
    engine.script = Script(chunks=[[token] for token in text])
    body = {"model": "tiny", "prompt": "x", "stop": ["END"], "stream": True}
    streamed = events(client.post("/v1/completions", json=body, headers=AUTH))
    sent = "".join(event["choices"][0]["text"] for event in streamed)
    assert sent == "abc "
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.cancelled, "the engine was not told to stop generating"


def test_chat_stream_opens_with_the_role_and_ends_with_usage(client, engine, tokenizer):
    hi = ids_of(tokenizer, "Hi")
    engine.script = Script(chunks=[hi, engine.eos_ids])
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    streamed = events(client.post("/v1/chat/completions", json=body, headers=AUTH))
    assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert streamed[-2]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip
    assert streamed[-1]["choices"] == []
    assert streamed[-1]["usage"]["completion_tokens"] == len(hi) + 1
    assert {event["object"] for event in streamed} == {"chat.completion.chunk"}
    assert len({event["id"] for event in streamed}) == 1


def test_completion_accepts_token_ids_and_a_list_of_one_text(client, engine):
    for prompt in ([5, 6, 7], ["hello"]):
        reply = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": prompt}, headers=AUTH
        )
        assert reply.status_code == 200, reply.text
    assert engine.submitted[0][0] == [5, 6, 7]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b'{"model": "tiny", "messages": [', None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"", None, "body: Field required"),
        ({"model": "tiny", "messages": []}, "messages", "at least 1"),
        ({**CHAT, "temperature": 9}, "temperature", "less than or equal to 2"),
        ({**CHAT, "n": 2}, "n", "Input should be 1"),
        ({**CHAT, "presence_penalty": 0.5}, "presence_penalty", "Input should be 0"),
        ({**CHAT, "stop": ["a", "b", "c"]}, "stop", "at most 2 stop sequences"),
        ({**CHAT, "stop": [""]}, "stop", "at least 1 character"),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 400}]}, "messages", "context"),
    ],
)
def test_bad_chat_request_is_400_naming_the_field(client, engine, body, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    error = error_of(client.post("/v1/chat/completions", content=content, headers=headers), 400)
    assert words in error["message"]
    if param is not None:
        assert error["param"].split(".")[0] == param
    assert not engine.submitted


def test_out_of_vocabulary_prompt_ids_are_400(client, tokenizer):
    body = {"model": "tiny", "prompt": [len(tokenizer) + 1]}
    error = error_of(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert error["param"] == "prompt"


def test_unknown_model_is_404_naming_the_served_ones(client):
    error = error_of(
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH), 404
    )
    assert error["param"] == "model" and "tiny" in error["message"]


def test_missing_or_wrong_key_is_401_and_probes_need_none(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.get("/v1/models", headers=headers)
        assert error_of(response, 401)["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").json() == {"status": "ok"}


def test_body_over_the_limit_is_413(client):
    body = {"model": "tiny", "prompt": "x" * 5000}
    error_of(client.post("/v1/completions", json=body, headers=AUTH), 413)


def test_loading_and_draining_are_503(client, app):
    runtime = app.state.runtime
    runtime.ready, runtime.phase = False, "weights"
    chat = lambda: client.post("/v1/chat/completions", json=CHAT, headers=AUTH)  # noqa: E731
    assert "loading (weights)" in error_of(chat(), 503)["message"]
    assert client.get("/ready").json() == {"ready": False, "phase": "weights"}
    assert client.get("/info").status_code == 503
    runtime.ready, runtime.draining = True, True
    assert "shutting down" in error_of(chat(), 503)["message"]


def test_an_engine_that_refuses_is_503_and_one_that_fails_is_500(client, engine, tokenizer):
    engine.script = Script(refuse=True)
    error_of(client.post("/v1/chat/completions", json=CHAT, headers=AUTH), 503)
    engine.script = Script(chunks=[ids_of(tokenizer, "Hi")], error="CUDA out of memory")
    error = error_of(client.post("/v1/chat/completions", json=CHAT, headers=AUTH), 500)
    assert "CUDA out of memory" in error["message"]
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert streamed.status_code == 200  # the stream had started; the error is its last event
    assert events(streamed)[-1]["error"]["code"] == 500


def test_wrong_method_is_405_with_allow(client):
    response = client.get("/v1/chat/completions", headers=AUTH)
    error_of(response, 405)
    assert response.headers["allow"] == "POST"


def test_client_that_hangs_up_cancels_its_request(app, engine, tokenizer):
    """A whole (not streamed) answer: the server notices the disconnect while waiting."""
    engine.script = Script(chunks=[ids_of(tokenizer, "Hi")], hold=True)
    body = json.dumps(CHAT).encode()
    sent: list[dict] = []

    async def call() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("t", 1), "server": ("app", 80),
            "headers": [(b"content-type", b"application/json"),
                        (b"authorization", AUTH["Authorization"].encode()),
                        (b"content-length", str(len(body)).encode())],
        }  # fmt: skip
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(call())
    assert sent[0]["status"] == 499
    assert engine.cancelled == ["tiny-1"]
    metrics = app.state.runtime.metrics.render().decode()
    assert 'llm_requests_total{endpoint="chat",model="tiny",status="499"} 1.0' in metrics
    assert "llm_requests_in_flight 0.0" in metrics


def test_models_info_and_metrics(client, app):
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list"
    assert [(m["id"], m["root"], m["max_model_len"]) for m in models["data"]] == [
        ("tiny", "/models/tiny", 64)
    ]
    assert client.get("/ready").json() == {"ready": True, "models": ["tiny"]}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "llm_ready" in metrics.text


def test_tokens_and_dollars_are_counted_per_served_model(engine, tokenizer):
    config = ServeConfig.model_validate(
        {
            "model": {"name_or_path": "/models/tiny", "served_name": "tiny"},
            "price": {"usd_per_1m_input_tokens": 2.0, "usd_per_1m_output_tokens": 8.0},
        }
    )
    other = ScriptedEngine("other", tokenizer)
    runtime = ScriptedRuntime(config, {"tiny": engine, "other": other})
    runtime._load_engines()
    transport = httpx.ASGITransport(app=create_app(config, runtime))
    answer = ids_of(tokenizer, "Hello there")
    engine.script = other.script = Script(chunks=[answer + engine.eos_ids])

    async def ask() -> list[dict]:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            bodies = [dict(CHAT, model=m) for m in ("tiny", "tiny", "other")]
            return [(await c.post("/v1/chat/completions", json=b)).json() for b in bodies]

    usages = [reply["usage"] for reply in asyncio.run(ask())]
    text = runtime.metrics.render().decode()
    for model, mine in (("tiny", usages[:2]), ("other", usages[2:])):
        label = '{model="' + model + '"} '
        prompt = sum(u["prompt_tokens"] for u in mine)
        completion = sum(u["completion_tokens"] for u in mine)
        assert f"llm_prompt_tokens_total{label}{float(prompt)}" in text
        assert f"llm_completion_tokens_total{label}{float(completion)}" in text
        usd = float(text.split(f"llm_cost_usd_total{label}")[1].split()[0])
        assert usd == pytest.approx((prompt * 2.0 + completion * 8.0) / 1e6)


def test_no_dollars_counter_without_a_price(client):
    client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    text = client.get("/metrics").text
    assert "llm_completion_tokens_total{" in text
    assert "llm_cost_usd_total{" not in text


def test_openapi_declares_bodies_answers_and_errors(client):
    document = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True
        assert set(operation["responses"]) == {"200", "400", "401", "404", "413", "500", "503"}
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json", "text/event-stream"
        }  # fmt: skip
        assert operation["security"] == [{"bearer": []}]
    assert "422" not in json.dumps(document["paths"])
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    schemas = document["components"]["schemas"]
    n = schemas["ChatCompletionRequest"]["properties"]["n"]
    assert n["anyOf"][0] == {"const": 1, "type": "integer"}  # what the server refuses, said
