"""GGUF export: llama.cpp's converter on a trained tiny run, read back and compared.

The tiny model here has a SentencePiece tokenizer: the converter recognizes BPE
tokenizers only by a hash of a known model's vocabulary, so it refuses the byte-level
BPE that conftest trains (see test_unrecognized_tokenizer_is_refused_with_the_reason).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CHAT_TEMPLATE, DATA, build_tiny_model, build_tiny_tokenizer
from {{ cookiecutter.package_name }}.chat import prompt_ids
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.export import (
    CLOSE,
    OPEN,
    GgufOptions,
    export_gguf,
    find_converter,
    modelfile,
)
from {{ cookiecutter.package_name }}.training.run import run_training
from tickets import conversations, tiny_config, write_ticket_data

# f16 rounds every weight to 11 significant bits; on this model (logits' std about 2.5)
# that moves a logit by a few hundredths. 0.1 is the stated bound.
F16_LOGIT_TOLERANCE = 0.1
GREEDY_TOKENS = 16
# Jinja's statement delimiters, spelled out: this file is itself rendered by a template engine.
TAG, END = "{" + "%", "%" + "}"
PROMPTS = 4


def build_spm_model(folder: Path) -> Path:
    """The tiny Llama with a SentencePiece BPE tokenizer (byte fallback, ChatML tokens)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(DATA / "tokenizer_corpus.txt"), model_prefix=str(folder / "tokenizer"),
        vocab_size=512, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], pad_id=0, unk_id=1, bos_id=-1,
        eos_id=-1, pad_piece="<|endoftext|>", minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    build_tiny_model(tokenizer).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def converter() -> Path:
    """llama.cpp's converter (fetched once into the cache); skipped only without PyPI."""
    try:
        return find_converter(None)
    except UserError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    model = build_spm_model(root / "tiny-spm")
    data = write_ticket_data(root)
    config = tiny_config(model, data, root / "runs", "train.max_steps=30", "output.run_name=spm")
    result = run_training(config)
    assert result.completed
    return result.run_dir


@pytest.fixture(scope="module")
def exported(spm_run: Path, converter: Path):
    assert not (spm_run / "merged").exists()
    return export_gguf(GgufOptions(run=spm_run, types=("f16", "q8_0")))


def held_out(spm_run: Path) -> list[list[dict[str, str]]]:
    eval_file = spm_run.parent.parent / "eval.jsonl"
    return [messages[:-1] for messages in conversations(eval_file)[:PROMPTS]]


def test_export_merges_first_and_writes_every_type_and_a_modelfile(spm_run, exported):
    assert (spm_run / "merged" / "config.json").is_file()
    assert exported.folder == spm_run / "gguf"
    assert sorted(p.name for p in exported.folder.iterdir()) == [
        "Modelfile", "spm-f16.gguf", "spm-q8_0.gguf",
    ]  # fmt: skip
    assert exported.files["q8_0"].stat().st_size < exported.files["f16"].stat().st_size
    assert not list(spm_run.glob(".*partial"))


def test_gguf_embeds_the_trained_chat_template_and_eos(spm_run, exported):
    import gguf

    reader = gguf.GGUFReader(exported.files["f16"])
    fields = reader.fields
    tokenizer = AutoTokenizer.from_pretrained(spm_run / "adapter")

    def text(key: str) -> str:
        return bytes(fields[key].parts[fields[key].data[0]]).decode()

    assert text("tokenizer.chat_template") == tokenizer.chat_template
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id


def test_f16_round_trip_matches_the_merged_model(spm_run, exported):
    """transformers' GGUF loader: same prompt ids, next-token logits within the tolerance,
    the same greedy answers."""
    folder, name = exported.files["f16"].parent, exported.files["f16"].name
    merged = AutoModelForCausalLM.from_pretrained(spm_run / "merged", dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spm_run / "merged")
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    worst = 0.0
    for messages in held_out(spm_run):
        ids = prompt_ids(tokenizer, messages)
        assert prompt_ids(gguf_tokenizer, messages) == ids
        inputs = torch.tensor([ids])
        with torch.no_grad():
            expected = merged(inputs).logits[0, -1]
            got = from_gguf.eval()(inputs).logits[0, -1]
        worst = max(worst, (expected - got).abs().max().item())
        greedy = {"max_new_tokens": GREEDY_TOKENS, "do_sample": False}
        answer = merged.generate(inputs, **greedy)[0, len(ids) :]
        assert from_gguf.generate(inputs, **greedy)[0, len(ids) :].tolist() == answer.tolist()
    assert worst <= F16_LOGIT_TOLERANCE, worst


def test_demo_gguf_step_reports_full_agreement_with_the_adapter(spm_run, exported, tmp_path):
    """The demo's --gguf stage: the GGUF's greedy answers equal the adapter's."""
    from peft import PeftModel

    from {{ cookiecutter.package_name }}.demo import gguf_agreement
    from {{ cookiecutter.package_name }}.runs import RunFolder
    from {{ cookiecutter.package_name }}.training.evaluate import generate_answers

    base = AutoModelForCausalLM.from_pretrained(spm_run.parent.parent / "tiny-spm")
    tuned = PeftModel.from_pretrained(base, spm_run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(spm_run / "adapter")
    held = conversations(spm_run.parent.parent / "eval.jsonl")[:8]
    adapter_answers = generate_answers(tuned, tokenizer, held)
    result = gguf_agreement(RunFolder(spm_run), tokenizer, held, adapter_answers, tmp_path / "g")
    assert result["same_answers"] == result["held_out"] == 8


def test_q8_0_loads_and_stays_close(spm_run, exported):
    folder, name = exported.files["q8_0"].parent, exported.files["q8_0"].name
    merged = AutoModelForCausalLM.from_pretrained(spm_run / "merged", dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spm_run / "merged")
    inputs = torch.tensor([prompt_ids(tokenizer, held_out(spm_run)[0])])
    with torch.no_grad():
        expected = merged(inputs).logits[0, -1]
        got = quantized.eval()(inputs).logits[0, -1]
    correlation = torch.corrcoef(torch.stack([expected, got]))[0, 1].item()
    assert correlation > 0.99, correlation


def test_llama_cpp_answers_like_the_merged_model(spm_run, exported):
    """llama.cpp itself, where llama-cpp-python is installed (it has no wheel on PyPI and
    compiles from source for minutes, so the CPU suite does not install it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    merged = AutoModelForCausalLM.from_pretrained(spm_run / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(spm_run / "merged")
    llm = llama_cpp.Llama(
        model_path=str(exported.files["f16"]), n_ctx=512, logits_all=True, verbose=False
    )
    try:
        for messages in held_out(spm_run):
            ids = prompt_ids(tokenizer, messages)
            inputs = torch.tensor([ids])
            with torch.no_grad():
                expected_logits = merged(inputs).logits[0, -1]
            llm.reset()
            llm.eval(ids)
            got_logits = torch.tensor(llm.scores[len(ids) - 1])
            assert (expected_logits - got_logits).abs().max().item() <= F16_LOGIT_TOLERANCE
            greedy = {"max_new_tokens": GREEDY_TOKENS, "do_sample": False}
            expected = merged.generate(inputs, **greedy)[0, len(ids) :].tolist()
            got: list[int] = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                got.append(token)
                if len(got) == len(expected) or token == tokenizer.eos_token_id:
                    break
            assert got == expected
    finally:
        llm.close()


def test_modelfile_has_the_template_and_stop_tokens(exported):
    lines = exported.modelfile.read_text().splitlines()
    assert lines[0] == "FROM ./spm-f16.gguf"
    text = exported.modelfile.read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    user = f'{OPEN} else if eq .Role "user" {CLOSE}<|im_start|>user\n{OPEN} .Content {CLOSE}'
    assert user + "<|im_end|>\n" in template
    assert template.endswith(f"{OPEN} end {CLOSE}{OPEN} end {CLOSE}<|im_start|>assistant\n")
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert 'PARAMETER stop "<|im_start|>"' in lines


def test_modelfile_keeps_a_default_system_prompt(tmp_path):
    """A template that adds a system turn when there is none (SmolLM2's does) gets SYSTEM."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        f"{TAG} if messages[0]['role'] != 'system' {END}<|im_start|>system\nBe brief.<|im_end|>\n"
        f"{TAG} endif {END}" + CHAT_TEMPLATE
    )
    text = modelfile(tokenizer, "m.gguf", [tokenizer.eos_token_id])
    assert 'SYSTEM """Be brief."""' in text


def test_a_template_ollama_cannot_express_is_refused_before_converting(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        f"{TAG} for m in messages {END}{TAG} if m['role'] == 'system' {END}"
        f"{TAG} set x = raise_exception('no system role') {END}{TAG} endif {END}"
        f"{OPEN} m['content'] {CLOSE}{TAG} endfor {END}"
    )
    with pytest.raises(UserError, match=r"an Ollama TEMPLATE \(no system role"):
        modelfile(tokenizer, "m.gguf", [tokenizer.eos_token_id])


def run_cli(capsys, *args: str) -> str:
    code = main(["export", "gguf", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err  # the progress bar shares stderr
    return errors[0]


def test_unknown_gguf_type_is_one_line(capsys, spm_run):
    err = run_cli(capsys, str(spm_run), "--type", "f16,q4_k_m")
    assert "unknown GGUF type 'q4_k_m'" in err and "llama-quantize" in err


def test_unsupported_architecture_is_refused_with_the_converters_reason(
    capsys, spm_run, exported, tmp_path
):
    run = tmp_path / "odd"
    shutil.copytree(spm_run, run, ignore=shutil.ignore_patterns("gguf", "checkpoints"))
    config = json.loads((run / "merged" / "config.json").read_text())
    config["architectures"] = ["TinyUnknownForCausalLM"]
    (run / "merged" / "config.json").write_text(json.dumps(config))
    err = run_cli(capsys, str(run), "--type", "f16")
    assert "Model TinyUnknownForCausalLM is not supported" in err
    assert not (run / "gguf").exists() and not (run / ".gguf.partial").exists()


def test_unrecognized_tokenizer_is_refused_with_the_reason(capsys, converter, tmp_path):
    """conftest's byte-level BPE is no tokenizer llama.cpp knows: its converter says so."""
    run = tmp_path / "bpe"
    merged = run / "merged"
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(merged)
    build_tiny_model(tokenizer).save_pretrained(merged)
    (run / "config.yaml").write_text(
        f"model:\n  name_or_path: {merged}\ncost:\n  gpu_hourly_usd: 1.0\n"
    )
    err = run_cli(capsys, str(run), "--type", "f16")
    assert "BPE pre-tokenizer was not recognized" in err
    assert not (run / "gguf").exists()


def test_a_folder_without_the_converter_is_named(capsys, spm_run, tmp_path):
    err = run_cli(capsys, str(spm_run), "--llama-cpp", str(tmp_path))
    assert f"{tmp_path} has no convert_hf_to_gguf.py" in err
