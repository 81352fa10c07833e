"""Shared fixtures: a tiny random causal LM built in code, so no test needs the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# ChatML, the same turn format as the default base model, so the prompt-format
# contract tests exercise the real shape of the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on the corpus this project ships, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train([str(DATA / "tokenizer_corpus.txt")], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A random Llama; the defaults (2 layers, hidden size 64) give about 0.1M parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wide enough init that the frozen output layer can express confident answers.
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def package_name() -> str:
    """The project's package (this file is copied into the project unrendered, and also
    runs where only tests/ is mounted, so it is looked up when asked)."""
    src = Path(__file__).resolve().parents[1] / "src"
    return next(folder.name for folder in src.iterdir() if (folder / "__init__.py").is_file())


def cli_help(command: str) -> str:
    """`<package> COMMAND --help` in a fresh process, which must import neither torch nor
    fastapi to answer; its text."""
    code = (
        "import sys\n"
        f"from {package_name()}.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
        "assert 'fastapi' not in sys.modules, 'help imported fastapi'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def pytest_configure(config: pytest.Config) -> None:
    """The CPU suite runs on the CPU on any machine: with GPUs hidden from this process and
    everything it starts (servers, training runs), `auto` picks the CPU and float32, as
    its tests expect. `pytest -m gpu` (nox -s gpu_tests) keeps them."""
    expression = config.option.markexpr
    if "gpu" not in expression or "not gpu" in expression:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny model and tokenizer, loadable with the Auto* classes."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_model(tokenizer).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def template_without_eos() -> str:
    """A chat template whose turns end in a newline, not in the EOS token."""
    return (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
