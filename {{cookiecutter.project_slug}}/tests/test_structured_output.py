"""Structured output: `response_format` through the real server with the openai client, and
the grammar mask inside one batch of the engine.

The tiny model is random, so each schema bounds what it allows (enums, integer ranges,
maxLength, maxItems): the grammar itself then brings every answer to an end.
"""

from __future__ import annotations

import asyncio
import json
from argparse import Namespace
from pathlib import Path

import httpx
import jsonschema
import llguidance.numpy
import openai
import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from {{ cookiecutter.package_name }}.inference import SamplingParams, eos_token_ids
from {{ cookiecutter.package_name }}.serving.batching import Grammar, allowed_tokens, cb_config_for
from {{ cookiecutter.package_name }}.serving.config import ServeConfig
from {{ cookiecutter.package_name }}.serving.engine import Engine
from server_process import serve_command, serve_env, start_server

KEY = "structured-key"

COLOR_COUNT = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "admin": {"type": "boolean"},
            },
            "required": ["name", "age", "admin"],
            "additionalProperties": False,
        }
    },
    "required": ["user"],
    "additionalProperties": False,
}
ARRAY = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                 "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                   "maxItems": 2},
    },
    "required": ["tags", "scores"],
    "additionalProperties": False,
}  # fmt: skip
SCHEMAS = {"enum": COLOR_COUNT, "nested": NESTED, "array": ARRAY}


def schema_format(schema: dict) -> dict:
    named = dict(name="answer", schema=schema, strict=True)
    return {"type": "json_schema", "json_schema": named}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    command = serve_command(
        tiny_model_dir, {}, "model.device=cpu", "model.served_name=tiny", f"server.port={port}"
    )
    log = tmp_path_factory.mktemp("structured") / "server.log"
    handle = start_server(command, port, log, serve_env(KEY))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def ask(client: openai.OpenAI, endpoint: str, stream: bool, **kwargs) -> tuple[str, str]:
    """The answer's text and finish reason from chat or completions, streamed or not."""
    if endpoint == "chat":
        messages = [{"role": "user", "content": "Answer in JSON."}]
        if not stream:
            choice = client.chat.completions.create(model="tiny", messages=messages, **kwargs)
            return choice.choices[0].message.content, choice.choices[0].finish_reason
        events = client.chat.completions.create(
            model="tiny", messages=messages, stream=True, **kwargs
        )
        parts, reason = [], None
        for event in events:
            parts.append(event.choices[0].delta.content or "")
            reason = event.choices[0].finish_reason or reason
        return "".join(parts), reason
    # OpenAI's legacy completions take no response_format; the client sends it as extra.
    if "response_format" in kwargs:
        kwargs["extra_body"] = {"response_format": kwargs.pop("response_format")}
    if not stream:
        answer = client.completions.create(model="tiny", prompt="JSON:", **kwargs)
        return answer.choices[0].text, answer.choices[0].finish_reason
    events = client.completions.create(model="tiny", prompt="JSON:", stream=True, **kwargs)
    parts, reason = [], None
    for event in events:
        parts.append(event.choices[0].text)
        reason = event.choices[0].finish_reason or reason
    return "".join(parts), reason


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_answer_validates_against_the_schema(client, name, endpoint, stream):
    schema = SCHEMAS[name]
    text, reason = ask(
        client, endpoint, stream, response_format=schema_format(schema), max_tokens=200,
        temperature=0,
    )  # fmt: skip
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow
def test_sampled_answers_validate_too(client):
    for seed in range(4):
        text, reason = ask(
            client, "chat", False, response_format=schema_format(NESTED), max_tokens=200,
            temperature=1.0, seed=seed,
        )  # fmt: skip
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), NESTED)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_json_object_answers_are_objects(client, endpoint):
    """A random model can write a key forever, so several seeds run at once (one batch): each
    that ends is a JSON object, one that hits max_tokens stopped for that reason only."""
    limit = 40

    async def run() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY) as pool:

            async def one(seed: int) -> tuple[str, str]:
                common = dict(response_format={"type": "json_object"}, max_tokens=limit,
                              temperature=1.0, seed=seed)  # fmt: skip
                if endpoint == "chat":
                    messages = [{"role": "user", "content": "JSON please"}]
                    chat = await pool.chat.completions.create(
                        model="tiny", messages=messages, **common
                    )
                    return chat.choices[0].message.content, chat.choices[0].finish_reason
                common["extra_body"] = {"response_format": common.pop("response_format")}
                text = await pool.completions.create(model="tiny", prompt="JSON:", **common)
                return text.choices[0].text, text.choices[0].finish_reason

            return await asyncio.gather(*(one(seed) for seed in range(8)))

    answers = asyncio.run(run())
    ended = [text for text, reason in answers if reason == "stop"]
    assert ended, answers
    for text in ended:
        assert isinstance(json.loads(text), dict), text
    assert all(text.startswith("{") for text, _ in answers), answers


@pytest.mark.slow
def test_text_format_is_free_text(client):
    free, _ = ask(client, "completions", False, max_tokens=8, temperature=0)
    same, _ = ask(
        client, "completions", False, max_tokens=8, temperature=0,
        response_format={"type": "text"},
    )  # fmt: skip
    assert same == free


BAD_FORMATS = [
    ("unknown type", {"type": "xml"}, "response_format", "xml"),
    ("no schema", {"type": "json_schema", "json_schema": dict(name="a")},
     "response_format.json_schema.schema", "schema"),
    ("not JSON Schema", schema_format({"type": "strnig"}),
     "response_format.json_schema.schema", "strnig"),
    ("unknown format", schema_format({"type": "string", "format": "colour"}),
     "response_format.json_schema.schema", "colour"),
    ("bad pattern", schema_format({"type": "string", "pattern": "(("}),
     "response_format.json_schema.schema", "unclosed group"),
    ("dangling ref", schema_format({"$ref": "#/$defs/missing"}),
     "response_format.json_schema.schema", "/$defs/missing"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("case", "response_format", "param", "named"), BAD_FORMATS, ids=[b[0] for b in BAD_FORMATS]
)
def test_a_bad_response_format_is_a_400_naming_it(
    server, client, endpoint, case, response_format, param, named
):
    body: dict = {"model": "tiny", "max_tokens": 4, "response_format": response_format}
    if endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    answer = httpx.post(
        server.url + endpoint, json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["param"] == param, error
    assert named in error["message"], error
    # The server keeps serving: a good constrained request right after answers.
    text, reason = ask(
        client, "completions", False, response_format=schema_format(COLOR_COUNT),
        max_tokens=100, temperature=0,
    )  # fmt: skip
    assert reason == "stop"
    jsonschema.validate(json.loads(text), COLOR_COUNT)


@pytest.mark.slow
def test_openapi_declares_response_format(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert "response_format" in request["properties"]
    names = json.dumps(schema["components"]["schemas"])
    assert "json_schema" in names and "json_object" in names


# ------------------------------------------------------------------ the engine, in-process
@pytest.fixture(scope="module")
def engine():

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    config = ServeConfig.model_validate({"model": dict(device="cpu")})
    cb = cb_config_for(config, "cpu", 512, 0, 1)
    served = Engine("tiny", model, tokenizer, 512, eos_token_ids(model, tokenizer), cb)
    served.start()
    yield served
    served.stop()


def generate(engine, prompt: str, max_tokens: int, schema: dict | None = None) -> list[int]:
    """Greedy tokens of one request, submitted on the running event loop."""

    async def run() -> list[int]:
        matcher = engine.grammars.matcher(schema, "schema") if schema else None
        ids = engine.tokenizer(prompt)["input_ids"]
        submission = engine.submit(ids, SamplingParams(max_tokens, temperature=0.0), matcher)
        tokens: list[int] = []
        async for chunk in submission.chunks():
            tokens += chunk
        return tokens

    return asyncio.run(run())


def test_an_unconstrained_row_is_untouched_by_a_constrained_one_in_its_batch(engine):
    alone = generate(engine, "Tell me", 24)

    async def together() -> list[list[int]]:
        matcher = engine.grammars.matcher(COLOR_COUNT, "schema")
        free = engine.submit(engine.tokenizer("Tell me")["input_ids"], SamplingParams(24, 0.0))
        bound = engine.submit(
            engine.tokenizer("JSON:")["input_ids"], SamplingParams(100, 0.0), matcher
        )
        answers = []
        for submission in (free, bound):
            tokens: list[int] = []
            async for chunk in submission.chunks():
                tokens += chunk
            answers.append(tokens)
        return answers

    free, bound = asyncio.run(together())
    assert free == alone
    assert free != generate(engine, "Tell me", 24, COLOR_COUNT)  # the mask did act
    text = engine.tokenizer.decode(bound, skip_special_tokens=True)
    jsonschema.validate(json.loads(text), COLOR_COUNT)


def test_a_complete_grammar_allows_exactly_our_eos_ids(engine):
    """llguidance's stop tokens are the engine's EOS ids, so a finished answer ends there."""
    matcher = engine.grammars.matcher(COLOR_COUNT, "schema")
    assert engine.grammars.tokenizer().eos_tokens == engine.eos_ids
    done = engine.tokenizer('{"color": "red", "count": 3}', add_special_tokens=False)
    assert matcher.consume_tokens(done["input_ids"])
    bitmask = llguidance.numpy.allocate_token_bitmask(1, engine.grammars.tokenizer().vocab_size)
    llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)

    allowed = allowed_tokens(torch.from_numpy(bitmask), len(engine.tokenizer))
    assert allowed[0].nonzero().flatten().tolist() == engine.eos_ids


def test_a_finished_or_cancelled_request_frees_its_matcher(engine):
    generate(engine, "JSON:", 100, COLOR_COUNT)
    assert engine.loop.processors.grammars == {}

    async def cancel_after_a_token() -> None:
        matcher = engine.grammars.matcher(NESTED, "schema")
        ids = engine.tokenizer("JSON:")["input_ids"]
        submission = engine.submit(ids, SamplingParams(200, 0.0), matcher)
        assert submission.request_id in engine.loop.processors.grammars
        async for _ in submission.chunks():
            break
        engine.cancel(submission)

    asyncio.run(cancel_after_a_token())
    assert engine.loop.processors.grammars == {}


def test_a_matcher_in_error_allows_only_eos(engine):
    """Should a matcher ever refuse a token, the request ends rather than go on unmasked."""
    grammar = Grammar(engine.grammars.matcher(COLOR_COUNT, "schema"), 512, engine.eos_ids)
    state = Namespace(_true_initial_tokens=0, initial_tokens=[], generated_tokens=[])
    state.generated_tokens = engine.tokenizer("plain text", add_special_tokens=False)["input_ids"]
    bitmask = llguidance.numpy.allocate_token_bitmask(1, 512)
    grammar.fill(state, bitmask, 0)
    assert grammar.matcher.is_error()
    allowed = allowed_tokens(torch.from_numpy(bitmask), 512)
    assert allowed[0].nonzero().flatten().tolist() == engine.eos_ids
