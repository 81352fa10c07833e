"""Write a stand-in base model: SmolLM2-135M-Instruct's exact shape, random weights.

    python -m tools.stand_in_base build/stand-in-base
    GPU_TESTS_BASE_MODEL=build/stand-in-base nox -s gpu_tests

For a GPU machine that cannot download the real base model. The GPU suite's base-model
tests then measure what depends on the shape (4-bit memory, kernels, tokens/s), not what
depends on the weights (answer quality); the tokenizer is the tests' small BPE with a
ChatML template. The folder holds stand_in.json, which the suite copies into
reports/gpu_tests.json so that no figure from it passes for the real model's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPE_OF = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARK = "stand_in.json"  # tests/test_gpu.py reads it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (an earlier stand-in is replaced)")
    args = parser.parse_args(argv)
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / MARK).is_file():
        parser.error(f"{args.out} is not empty and holds no stand-in: name a new folder")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(  # the config.json of SmolLM2-135M-Instruct
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    parameters = sum(p.numel() for p in model.parameters())
    note = (
        f"random weights in the shape of {SHAPE_OF} ({parameters / 1e6:.1f}M parameters) and "
        "the tests' tokenizer: memory, kernels and speed are the real shape's, answers are not"
    )
    mark = {"shape_of": SHAPE_OF, "parameters": parameters, "note": note}
    (args.out / MARK).write_text(json.dumps(mark, indent=2) + "\n", encoding="utf-8")
    print(f"{args.out}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
