"""The test fixture itself: later tests rely on it behaving like a real model folder."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_loads_with_auto_classes(tiny_model_dir):
    assert (tiny_model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_tokenizer_is_byte_level_and_lossless(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = 'Reverse "naïve" — 12 + 7 = 19 ✓'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_turns_and_generation_prompt(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 12 plus 7?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 12 plus 7?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


def test_tiny_model_generates_deterministically(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = tokenizer("The assistant", return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert first.shape[1] == inputs["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in first
    assert torch.equal(first, second)
