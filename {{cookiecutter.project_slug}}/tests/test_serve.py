"""The server, started for real on a free loopback port, driven by the official openai client.

One server process (tiny base + two adapters) serves the whole module, so the suite pays
for one cold start; the SIGTERM test stops it and therefore runs last.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from lora_adapters import random_adapter, stop_adapter
from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from server_process import Server, serve_command, serve_env, start_server

pytestmark = pytest.mark.slow

KEY = "test-key-123"
CAP = 400  # limits.max_tokens_cap of the test server
BODY_LIMIT = 32768
MESSAGES = [{"role": "user", "content": "What is 12 plus 7?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "stopper": stop_adapter(tiny_model_dir, root / "stopper"),
        "random": random_adapter(tiny_model_dir, root / "random"),
    }


def serve_overrides(port: int) -> list[str]:
    """The test server's settings. The device is named: on a machine with a GPU, `auto`
    would pick it, and these tests expect the CPU in float32."""
    return [
        "model.device=cpu",
        "model.served_name=tiny",
        f"server.port={port}",
        f"limits.max_tokens_cap={CAP}",
        f"server.max_body_bytes={BODY_LIMIT}",
        "server.shutdown_grace_s=20",
    ]


def launch(model_dir: Path, adapters: dict[str, Path], log: Path) -> Server:
    port = free_port()
    command = serve_command(model_dir, adapters, *serve_overrides(port))
    return start_server(command, port, log, serve_env(KEY))


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, tmp_path_factory):
    handle = launch(tiny_model_dir, adapters, tmp_path_factory.mktemp("server") / "server.log")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapters):
    """Greedy generation with plain transformers/peft: what the server must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {"tiny": AutoModelForCausalLM.from_pretrained(tiny_model_dir)}
    for name in ("random", "stopper"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        models[name] = PeftModel.from_pretrained(base, adapters[name]).eval()

    def generate(model: str, ids: list[int], max_tokens: int) -> tuple[str, int]:
        with torch.no_grad():
            out = models[model].generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    def chat_ids(messages: list[dict]) -> list[int]:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]

    generate.tokenizer = tokenizer
    generate.chat_ids = chat_ids
    return generate


def test_ready_is_false_while_loading_then_true(server):
    first_status, first_body = server.ready_seen[0]
    assert first_status == 503 and first_body["ready"] is False and first_body["phase"]
    assert server.ready_seen[-1] == (200, {"ready": True, "models": ["tiny", "stopper", "random"]})
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    metrics = server.metrics()
    for phase in ("imports", "weights", "adapters", "warmup", "ready"):
        assert metrics['llm_cold_start_seconds{phase="' + phase + '"}'] >= 0
    assert metrics["llm_ready"] == 1


def test_chat_equals_reference_with_exact_usage(client, reference):
    ids = reference.chat_ids(MESSAGES)
    text, count = reference("tiny", ids, 12)
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == count
    assert reply.usage.total_tokens == len(ids) + count
    assert reply.choices[0].finish_reason == ("length" if count == 12 else "stop")


def test_chat_streaming_with_usage(client, reference):
    ids = reference.chat_ids(MESSAGES)
    text, count = reference("tiny", ids, 12)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length" if count == 12 else "stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == count
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "The", "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_completion_streaming_and_not(client, reference):
    prompt = "The assistant answers"
    ids = reference.tokenizer(prompt)["input_ids"]
    text, count = reference("tiny", ids, 10)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), count)
    stream = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == count


def test_stop_sequence_cuts_the_text(client):
    full = client.completions.create(model="tiny", prompt="Once", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text.find(text[i : i + 2]) == i)
    cut = client.completions.create(
        model="tiny", prompt="Once", max_tokens=24, temperature=0, stop=[stop, "\x00never"]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens
    streamed = client.completions.create(
        model="tiny", prompt="Once", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_max_tokens_is_honoured_and_capped(client):
    three = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert three.usage.completion_tokens == 3
    assert three.choices[0].finish_reason == "length"
    huge = client.completions.create(model="tiny", prompt="Hello", max_tokens=100_000)
    assert 1 <= huge.usage.completion_tokens <= CAP
    if huge.usage.completion_tokens == CAP:
        assert huge.choices[0].finish_reason == "length"


def test_eos_stops_a_model_trained_to_stop(client):
    messages = [{"role": "user", "content": "say something long about the sea"}]
    base = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=32, temperature=0
    )
    assert base.choices[0].finish_reason == "length"  # the random base never ends its turn
    tuned = client.chat.completions.create(
        model="stopper", messages=messages, max_tokens=32, temperature=0
    )
    assert tuned.choices[0].finish_reason == "stop"
    assert tuned.usage.completion_tokens <= 4  # "ok" and EOS, counted as generated
    assert "<|im_end|>" not in tuned.choices[0].message.content


def test_adapter_is_selected_by_name(client, reference):
    ids = reference.chat_ids(MESSAGES)
    answers = {}
    for model in ("tiny", "random"):
        text, count = reference(model, ids, 12)
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=12, temperature=0
        )
        assert reply.model == model
        assert reply.choices[0].message.content == text
        assert reply.usage.completion_tokens == count
        answers[model] = text
    assert answers["tiny"] != answers["random"]


def test_models_endpoint(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "stopper", "random"}
    assert models["random"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["max_model_len"] == 512


def test_info_names_device_precision_and_tokenizers(server):
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["engine"] == "transformers-continuous-batching"
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert info["device_name"]
    models = {m["id"]: m for m in info["models"]}
    assert set(models) == {"tiny", "stopper", "random"}
    assert models["random"]["parent"] == "tiny"
    assert models["tiny"]["tokenizer"] == models["tiny"]["source"]
    assert models["tiny"]["max_model_len"] == 512
    # What the library chose: no flash attention on a CPU, so none of what needs it.
    for model in models.values():
        assert model["attention"] in ("sdpa", "paged|eager")
        assert (model["cuda_graphs"], model["async_batching"], model["decode_fast_path"]) == (
            False, False, False,
        )  # fmt: skip


def test_seed_gives_the_same_sample_whatever_the_batch(client):
    def sample(seed: int) -> str:
        reply = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=16, temperature=1.0, seed=seed
        )
        return reply.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first

    async def crowd() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=str(client.base_url), api_key=KEY, max_retries=0
        ) as aclient:
            replies = await asyncio.gather(
                *(
                    aclient.completions.create(
                        model="tiny", prompt="Hello", max_tokens=16, temperature=1.0, seed=seed
                    )
                    for seed in [7, 1, 2, 3, 7, 4, 5, 7]
                )
            )
        return [r.choices[0].text for r in replies]

    batch = asyncio.run(crowd())
    assert batch[0] == batch[4] == batch[7] == first


def test_32_concurrent_requests_all_succeed(client, server, reference):
    ids = reference.chat_ids(MESSAGES)
    expected, count = reference("tiny", ids, 16)

    async def run() -> list:
        async with openai.AsyncOpenAI(
            base_url=str(client.base_url), api_key=KEY, max_retries=0, timeout=120
        ) as aclient:

            async def one(i: int):
                if i % 2:
                    return await aclient.chat.completions.create(
                        model="tiny", messages=MESSAGES, max_tokens=16, temperature=0
                    )
                stream = await aclient.chat.completions.create(
                    model=["tiny", "random", "stopper"][i % 3],
                    messages=MESSAGES,
                    max_tokens=16,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                return [chunk async for chunk in stream]

            return await asyncio.gather(*(one(i) for i in range(32)))

    before = server.metrics()
    results = asyncio.run(run())
    for i, result in enumerate(results):
        if i % 2:  # greedy answers do not depend on what else is in the batch
            assert result.choices[0].message.content == expected
            assert result.usage.completion_tokens == count
        else:
            assert result[-1].usage.completion_tokens >= 1
    after = server.metrics()
    ok = 'llm_requests_total{endpoint="chat",model="tiny",status="200"}'
    assert after[ok] - before.get(ok, 0) >= 16
    assert after["llm_requests_in_flight"] == 0


BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400),
    ("wrong type", "/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "x"}]}, 400),
    ("temperature", "/v1/completions", {"model": "tiny", "prompt": "a", "temperature": 9}, 400),
    ("n > 1", "/v1/completions", {"model": "tiny", "prompt": "a", "n": 2}, 400),
    (
        "max_tokens type",
        "/v1/completions",
        {"model": "tiny", "prompt": "a", "max_tokens": "x"},
        400,
    ),
    ("no prompt", "/v1/completions", {"model": "tiny"}, 400),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "a"}, 404),
    ("too long", "/v1/completions", {"model": "tiny", "prompt": [5] * 600}, 400),
    ("bad token id", "/v1/completions", {"model": "tiny", "prompt": [10**6]}, 400),
    ("body too large", "/v1/completions", {"model": "tiny", "prompt": "x" * BODY_LIMIT}, 413),
    ("unknown path", "/v1/nothing", {}, 404),
]


@pytest.mark.parametrize(
    ("case", "path", "body", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    server, client, case, path, body, status
):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status
    if case == "too long":
        assert "600" in error["message"] and "512" in error["message"]
    if case == "unknown model":
        assert error["param"] == "model"
    after = client.completions.create(model="tiny", prompt="ok", max_tokens=2)
    assert after.usage.completion_tokens == 2


def test_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(8):
            yield b" " * (BODY_LIMIT // 4)

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=headers)
    assert response.status_code == 413


def test_auth_rejects_a_missing_or_wrong_key(server):
    url = f"{server.url}/v1/models"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    no_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def _metric(server: Server, name: str) -> float:
    return server.metrics().get(name, 0.0)


def test_client_disconnect_cancels_generation_and_frees_capacity(server):
    pending = 'llm_engine_pending_requests{model="tiny"}'
    tokens = 'llm_completion_tokens_total{model="tiny"}'
    before = _metric(server, tokens)
    body = {"model": "tiny", "prompt": "Tell", "max_tokens": CAP, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    streams = 6
    with httpx.Client(timeout=30) as http:
        responses = []
        for _ in range(streams):
            request = http.build_request(
                "POST", f"{server.url}/v1/completions", json=body, headers=headers
            )
            responses.append(http.send(request, stream=True))
        for response in responses:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event: generation is under way
        for response in responses:
            response.close()  # hang up mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metric(server, pending) == 0 and _metric(server, "llm_requests_in_flight") == 0:
            break
        time.sleep(0.05)
    assert _metric(server, pending) == 0, "the engine still holds the abandoned requests"
    assert _metric(server, "llm_requests_in_flight") == 0
    assert _metric(server, tokens) - before < streams * CAP, "generation ran to the end"
    closed = 'llm_requests_total{endpoint="completions",model="tiny",status="499"}'
    assert _metric(server, closed) >= streams


@pytest.fixture
def own_server(tiny_model_dir, tmp_path):
    """For a test that stops its server: no other test depends on running after it."""
    handle = launch(tiny_model_dir, {}, tmp_path / "server.log")
    yield handle
    handle.stop()


def test_sigterm_drains_in_flight_requests_then_exits(own_server):
    server = own_server
    body = {"model": "tiny", "prompt": "Tell", "max_tokens": CAP, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    events: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(30)
    server.process.send_signal(signal.SIGTERM)
    at_signal = len(events)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no longer accepting connections
        httpx.get(f"{server.url}/health", timeout=2)
    reader.join(60)
    assert server.process.wait(30) == 0
    assert events[-1] == "data: [DONE]", "the in-flight stream was cut"
    assert len(events) > at_signal + 2, "the stream had ended before the signal"
    final = json.loads(events[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] in {"stop", "length"}
    assert re.search(r"signal .*draining", server.log.read_text())
