"""engine.kind=vllm for real: vLLM's CPU build, from .venv-vllm, serving a tiny model and its
adapters (`nox -s vllm_tests`; the default `pytest` run deselects them).

One server for the module, since vLLM takes about half a minute to start here. The model
is the tiny Llama with 32-wide attention heads, a size vLLM's CPU kernels take. The checks:
train -> serve parity (each adapter's greedy tokens through vLLM equal peft's), and the
wire contract our own server keeps, with the differences named where vLLM's differs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from lora_adapters import random_adapter
from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from server_process import Server, serve_command, serve_env, start_server
from tickets import PROJECT, tiny_config, write_ticket_data

pytestmark = pytest.mark.vllm

KEY = "vllm-test-key"
VLLM_PYTHON = PROJECT / ".venv-vllm" / "bin" / "python"
QUESTION = [{"role": "user", "content": "My invoice shows the wrong amount, please fix it"}]
ANSWER_TOKENS = 16
GRACE_S = 60  # server.shutdown_grace_s of the test server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: `nox -s vllm_env -- --cpu`")
    path = tmp_path_factory.mktemp("tiny-vllm")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_model(tokenizer, hidden_size=128).save_pretrained(path)  # heads of 32
    return path


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    """The LoRA variants vLLM serves: plain, rsLoRA (alpha / sqrt(r)), and PiSSA as the
    run saves it (converted to a plain LoRA of rank 2r on the untouched base)."""
    from {{ cookiecutter.package_name }}.training.run import run_training

    root = tmp_path_factory.mktemp("vllm-adapters")
    data = write_ticket_data(root)
    pissa = tiny_config(
        model_dir, data, root, "lora.init=pissa", "lora.r=4", "train.max_steps=10",
        "data.eval=null", "model.device=cpu", "output.run_name=pissa",
    )  # fmt: skip
    return {
        "plain": random_adapter(model_dir, root / "plain", seed=1),
        "rslora": random_adapter(model_dir, root / "rslora", seed=2, use_rslora=True),
        "pissa": run_training(pissa).run.adapter,
    }


def launch(model_dir: Path, adapters: dict[str, Path], log: Path) -> Server:
    port = free_port()
    command = serve_command(
        model_dir, adapters, "engine.kind=vllm", f"engine.vllm_python={VLLM_PYTHON}",
        "model.served_name=tiny", "model.dtype=float32", "model.max_context=512",
        f"server.port={port}", "engine.vllm_cpu_kv_cache_gib=1",
        f"server.shutdown_grace_s={GRACE_S}",
    )  # fmt: skip
    return start_server(command, port, log, serve_env(KEY), ready_path="/health", timeout=600)


@pytest.fixture(scope="module")
def server(model_dir, adapters, tmp_path_factory):
    handle = launch(model_dir, adapters, tmp_path_factory.mktemp("vllm") / "server.log")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def peft_greedy(model_dir: Path, adapter: Path | None, ids: list[int]) -> list[int]:
    """The trained model's greedy tokens: peft on the base, as training left it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([ids]), max_new_tokens=ANSWER_TOKENS, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def question_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    from {{ cookiecutter.package_name }}.chat import prompt_ids

    return prompt_ids(AutoTokenizer.from_pretrained(model_dir), QUESTION)


def served_tokens(client: openai.OpenAI, model: str, ids: list[int]) -> list[int]:
    reply = client.completions.create(
        model=model, prompt=ids, max_tokens=ANSWER_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    return list(reply.choices[0].model_extra["token_ids"])


@pytest.mark.parametrize("name", ["plain", "rslora", "pissa"])
def test_each_adapter_answers_through_vllm_token_for_token_as_peft(
    name, client, model_dir, adapters
):
    ids = question_ids(model_dir)
    expected = peft_greedy(model_dir, adapters[name], ids)
    assert served_tokens(client, name, ids) == expected
    assert expected != peft_greedy(model_dir, None, ids)  # the adapter changes the answer


def test_the_base_is_served_by_its_name_and_unknown_names_are_404(client, model_dir):
    ids = question_ids(model_dir)
    assert served_tokens(client, "tiny", ids) == peft_greedy(model_dir, None, ids)
    assert {m.id for m in client.models.list().data} == {"tiny", "plain", "rslora", "pissa"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


def test_streaming_gives_the_same_text_and_exact_usage(client):
    request = {"model": "plain", "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**request)
    stream = client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_strings_and_token_limits(client):
    request = {"model": "plain", "messages": QUESTION, "temperature": 0}
    full = client.chat.completions.create(**request, max_tokens=12).choices[0].message.content
    assert len(full) > 4
    cut = full[2:4]
    stopped = client.chat.completions.create(**request, max_tokens=12, stop=[cut]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == full[: full.index(cut)]  # the stop string is not sent
    limited = client.chat.completions.create(**request, max_tokens=3)
    assert limited.choices[0].finish_reason == "length"
    assert limited.usage.completion_tokens == 3


TICKET = {
    "type": "object",
    "properties": {
        "team": {"enum": ["billing", "shipping", "returns"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 3},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["team", "priority", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_response_format_reaches_vllms_structured_output(client, stream):
    """Nothing of ours stands between the request and vLLM's own grammar backend."""
    named = dict(name="ticket", schema=TICKET, strict=True)
    response_format = {"type": "json_schema", "json_schema": named}
    request = {"model": "plain", "messages": QUESTION, "max_tokens": 200, "temperature": 0,
               "response_format": response_format}  # fmt: skip
    if stream:
        events = list(client.chat.completions.create(**request, stream=True))
        text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
        reason = [e.choices[0].finish_reason for e in events if e.choices][-1]
    else:
        reply = client.chat.completions.create(**request)
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), TICKET)


def test_a_schema_vllm_cannot_compile_is_a_400(client):
    named = dict(name="bad", schema=dict(type="strnig"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="plain", messages=QUESTION, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": named},
        )  # fmt: skip
    after = client.completions.create(model="tiny", prompt="ok", max_tokens=2)
    assert after.usage.completion_tokens == 2


def test_the_api_key_is_required(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 401
    authorized = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, headers=authorized, timeout=30)
    assert reply.status_code == 200


def test_sigterm_drains_the_request_in_flight_then_exits(server):
    """Runs last (it stops the module's server). As ours does for server.shutdown_grace_s,
    vLLM finishes requests in flight before it exits (--shutdown-timeout, the same grace)."""
    body = {"model": "tiny", "prompt": "Tell", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    received, signalled = 0, None
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += 1
                if received == 5:
                    server.process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
    assert received == 200  # drained to the end, not cut off
    assert server.process.wait(timeout=GRACE_S) == 0
    assert signalled is not None and time.monotonic() - signalled < GRACE_S


def test_token_cost_compares_ours_and_vllm_on_the_same_traffic(model_dir, tmp_path, monkeypatch):
    """One token-cost run, both engines in turn on the tiny model (after the module's vLLM
    has exited): vLLM's device, dtype, version and start phases come from its log, and
    the engine named for each traffic cell has the lower measured price."""
    from {{ cookiecutter.package_name }}.cost.command import run_token_cost
    from {{ cookiecutter.package_name }}.cost.config import load_token_cost_config

    monkeypatch.chdir(PROJECT)
    server = (
        "[model.dtype=float32, model.max_context=512, engine.vllm_cpu_kv_cache_gib=1, "
        f"engine.vllm_python={VLLM_PYTHON}]"
    )
    config = load_token_cost_config(None, [
        f"server.model={model_dir}", "server.config=null", "server.ready_timeout_s=600",
        f"server.overrides={server}", "prompts.source=synthetic", "prompts.input_tokens=32",
        "prompts.output_tokens=8", "load.concurrency=[1,2]",
        "load.requests_per_level=3", "load.warmup_requests=1", "slo.ttft_s=60", "slo.e2e_s=120",
        "serverless.requests_per_hour=[1,3600]", f"report.dir={tmp_path}",
        "price.reference_prices=null",
        "engines=[{name: ours, serve: [engine.kind=transformers]}, "
        "{name: vllm, serve: [engine.kind=vllm]}]",
    ])  # fmt: skip
    card, _ = run_token_cost(config)
    assert not card.partial, card.partial_reasons
    assert card.engines is not None
    ours, vllm = card.engines.arms
    assert ours.measured and vllm.measured and ours.serving and vllm.serving
    assert vllm.dtype == "float32" and vllm.device.startswith("cpu (vLLM 0.32")
    assert vllm.serving.model.engine == "vllm" and vllm.serving.model.engine_version == "0.32.0"
    cold = vllm.serving.cold_start
    assert cold is not None and cold.ready_s
    assert {"api_server_start", "weights", "engine_init"} <= set(cold.server_phases_s)
    assert ours.serving.load.prompts.sha256 == vllm.serving.load.prompts.sha256
    assert card.engines.fair, card.engines.unfair
    for choice in card.engines.choices:
        prices = choice.usd_per_1m_output_tokens
        if choice.cheaper is not None:
            assert prices[choice.cheaper] == min(p for p in prices.values() if p is not None)
