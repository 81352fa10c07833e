"""LoRA adapters on the tiny model, built in code for the generate and serve tests."""

from __future__ import annotations

from pathlib import Path

STOP_ANSWER = "ok"
QUESTIONS = [
    "hi",
    "what is 2+2?",
    "tell me a story",
    "reverse abc",
    "hello there",
    "name a colour",
    "why?",
    "count to three",
]


def random_adapter(base_dir: Path, out_dir: Path, seed: int = 1, **lora_options) -> Path:
    """An adapter with random non-zero weights: its outputs differ from the base.
    `lora_options` go to peft's LoraConfig (use_dora=True, modules_to_save=[...], ...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora_options
    )
    get_peft_model(model, config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def stop_adapter(base_dir: Path, out_dir: Path, steps: int = 40) -> Path:
    """An adapter trained, in the training format, to answer "ok" and end the turn.

    A few dozen full-batch steps on the tiny model, encoded by `encode_conversation`
    (the function training uses), so serving it checks that the served prompt format
    is the trained one and that EOS ends generation.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from {{ cookiecutter.package_name }}.chat import IGNORE_INDEX, encode_conversation

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, config)
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": STOP_ANSWER}]
        for q in QUESTIONS
    ]
    encoded = [encode_conversation(tokenizer, c) for c in conversations]
    width = max(len(e.input_ids) for e in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in encoded])
    mask = torch.tensor(
        [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded]
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # as training does: the adapter carries its template
    return out_dir
