"""`generate`: streamed answers from the base, the base + an adapter, and a merged model."""

from __future__ import annotations

import json

import pytest

from lora_adapters import random_adapter
from {{ cookiecutter.package_name }}.cli import main

QUESTION = "What is 12 plus 7?"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return random_adapter(tiny_model_dir, tmp_path_factory.mktemp("gen") / "adapter")


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gen") / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def reference(model_dir, adapter_dir, ids, max_tokens):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def chat_ids(model_dir, messages):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]


def run(capsys, *args):
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out.removesuffix("\n"), captured.err


def test_base_answer_streams_the_greedy_reference(tiny_model_dir, capsys):
    ids = chat_ids(tiny_model_dir, [{"role": "user", "content": QUESTION}])
    code, out, err = run(capsys, QUESTION, "--model", str(tiny_model_dir), "--max-tokens", "12")
    assert code == 0
    assert out == reference(tiny_model_dir, None, ids, 12)
    assert "tokens" in err and "cpu float32" in err


def test_adapter_and_merged_model_answer_alike(tiny_model_dir, adapter, merged, capsys):
    ids = chat_ids(tiny_model_dir, [{"role": "user", "content": QUESTION}])
    expected = reference(tiny_model_dir, adapter, ids, 12)
    base_args = ["--max-tokens", "12"]
    _, with_adapter, _ = run(
        capsys, QUESTION, "--model", str(tiny_model_dir), "--adapter", str(adapter), *base_args
    )
    _, from_merged, _ = run(capsys, QUESTION, "--model", str(merged), *base_args)
    _, from_base, _ = run(capsys, QUESTION, "--model", str(tiny_model_dir), *base_args)
    assert with_adapter == expected
    assert from_merged == expected
    assert from_base != expected


def test_chat_file_and_system_message(tiny_model_dir, tmp_path, capsys):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": QUESTION},
    ]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": messages}))
    full = [{"role": "system", "content": "Be brief."}, *messages]
    expected = reference(tiny_model_dir, None, chat_ids(tiny_model_dir, full), 8)
    code, out, _ = run(
        capsys,
        "--chat",
        str(chat),
        "--system",
        "Be brief.",
        "--model",
        str(tiny_model_dir),
        "--max-tokens",
        "8",
    )
    assert code == 0 and out == expected


def test_raw_completion(tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("Once upon")["input_ids"]
    code, out, _ = run(
        capsys, "Once upon", "--raw", "--model", str(tiny_model_dir), "--max-tokens", "6"
    )
    assert code == 0 and out == reference(tiny_model_dir, None, ids, 6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a prompt"),
        (["hi", "--adapter", "/no/such/adapter"], "does not exist"),
        (["--chat", "/no/such.json", "hi"], "not both"),
    ],
)
def test_user_errors(tiny_model_dir, capsys, args, message):
    code, _, err = run(capsys, *args, "--model", str(tiny_model_dir))
    assert code == 2
    assert message in err


def test_adapter_with_pickled_weights_is_refused(tiny_model_dir, adapter, tmp_path, capsys):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    code, _, err = run(capsys, "hi", "--model", str(tiny_model_dir), "--adapter", str(pickled))
    assert code == 2
    assert "only safetensors" in err
