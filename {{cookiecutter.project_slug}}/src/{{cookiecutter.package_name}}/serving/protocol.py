"""The OpenAI wire format: request bodies, validated, and the error body.

Unknown fields are ignored, as OpenAI-compatible servers do; known fields this server
cannot honour (n > 1, logprobs, tools, penalties) are refused rather than silently
ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ApiError(Exception):
    """An error answered in OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type_: str, param: str | None, code: int | str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Lenient):
    include_usage: bool = False


class SamplingRequest(Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> SamplingRequest:
        if self.n not in (None, 1):
            raise ValueError("n > 1 is not supported; send separate requests")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if all(isinstance(p, str) for p in prompt):
                if len(prompt) != 1:
                    raise ValueError("one prompt per request; send a list of prompts separately")
                return prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens


class ServedModelInfo(BaseModel):
    """One served model, as GET /info reports it."""

    id: str = Field(description="the name requests use in `model`")
    source: str = Field(description="where its weights (or the adapter) were loaded from")
    parent: str | None = Field(description="for an adapter: the served name of its base model")
    tokenizer: str = Field(description="where its tokenizer was loaded from")
    max_model_len: int = Field(description="context window in tokens, prompt and answer")


class ServerInfo(BaseModel):
    """What the server runs on, so a client (the cost meter) reads it instead of guessing."""

    engine: Literal["transformers-continuous-batching"]
    engine_version: str = Field(description="the transformers version")
    device: str = Field(description="torch device of the weights, e.g. cpu or cuda:0")
    device_name: str = Field(description="GPU or CPU model name")
    dtype: str = Field(description="compute precision, e.g. float32 or bfloat16")
    models: list[ServedModelInfo]
