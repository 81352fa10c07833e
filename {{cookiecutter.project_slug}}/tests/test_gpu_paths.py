"""The code paths a GPU user takes first, run on the CPU: bf16 serving, adapters fitted to a
4-bit base, the device and dtype choice, and the batching settings chosen for a GPU.

A float32 CPU run cannot see dtype bugs, so these tests run the tiny model in bf16 (slow on
a CPU without native bf16, but correct) and fake the GPU where only its properties matter.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lora_adapters import random_adapter
from tickets import CONFIG

# Positions far enough out that a rounded rotary frequency shows: the angle error grows
# with the position (the tiny model's context is 512).
LONG_PROMPT = 480


def long_ids(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (1, LONG_PROMPT), generator=generator)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def merged_copy(base_dir: Path, adapter: Path, out: Path) -> Path:
    """base + adapter merged in float32 and saved, as `merge` writes it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


# --- an adapter served in bf16 ---------------------------------------------------------------


def test_adapter_served_in_bf16_keeps_the_rotary_table_in_float32(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.inference import attach_adapter

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    served = attach_adapter(base, adapter, "tuned", share_base=True)

    buffers = {name: b.dtype for name, b in served.named_buffers() if "inv_freq" in name}
    assert buffers and set(buffers.values()) == {torch.float32}, buffers
    lora = {p.dtype for name, p in served.named_parameters() if "lora_" in name}
    assert lora == {torch.bfloat16}  # the adapter's own weights do take the serving dtype

    # What a merged model of the same run answers, served in bf16 from its folder.
    merged = AutoModelForCausalLM.from_pretrained(
        merged_copy(tiny_model_dir, adapter, tmp_path / "merged"), dtype=torch.bfloat16
    ).eval()
    ids = long_ids()
    got, expected, plain = logits(served, ids), logits(merged, ids), logits(base, ids)
    late = slice(LONG_PROMPT - 100, None)
    scale = expected.abs().max().item()
    diff = (got - expected)[0, late].abs().mean().item()
    # Mean |difference| over the last 100 positions and the vocabulary, against the logit
    # scale (about 11). bf16 rounds W + BA once (merged) and x·W + x·B·A twice (served):
    # 0.6-0.8% of the scale, at any position. A bf16 rotary table adds an angle error that
    # grows with the position: 1.7-1.9% here (4 prompts), 1% at the first positions.
    tolerance = 0.012 * scale
    assert diff < tolerance, (diff, scale)
    assert (plain - expected)[0, late].abs().mean().item() > 5 * tolerance


def test_shared_base_keeps_its_dtypes_after_an_adapter_is_attached(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.inference import attach_adapter

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    before = {name: (t.dtype, t.data_ptr()) for name, t in base.state_dict().items()}
    attach_adapter(base, adapter, "tuned", share_base=True)
    after = {name: (t.dtype, t.data_ptr()) for name, t in base.state_dict().items()}
    assert after == before


# --- adapters fitted to a 4-bit base (LoftQ) -------------------------------------------------

NF4 = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "dtype": "float32"}


@pytest.fixture(scope="module")
def residual_run(tiny_model_dir, tmp_path_factory):
    """A run folder whose adapter was fitted to the 4-bit base, as LoftQ leaves it.

    peft's LoftQ needs CUDA, so the adapter is built here the same way: B·A is the rank-r
    SVD of W - Q(W), then moved on (as training would) so that it is not exactly the
    residual. The reference is that adapter on a base whose weights ARE Q(W)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.config import load_config
    from {{ cookiecutter.package_name }}.quantized_base import QuantizedBase, quantize_roundtrip
    from {{ cookiecutter.package_name }}.runs import RunFolder

    spec = QuantizedBase(**NF4)
    root = tmp_path_factory.mktemp("loftq")
    run = RunFolder(root / "run")
    run.path.mkdir()
    run.write_config(
        load_config(
            CONFIG,
            [f"model.name_or_path={tiny_model_dir}", "quantization.mode=4bit", "lora.init=loftq"],
        )
    )
    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"),
    )
    for module in model.modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            residual = weight - quantize_roundtrip(weight, spec)
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                b.copy_(u[:, :8] * s[:8].sqrt() + 0.01 * torch.randn_like(b))
                a.copy_(s[:8].sqrt()[:, None] * vh[:8] + 0.01 * torch.randn_like(a))
    model.save_pretrained(run.adapter)
    spec.write(run.adapter)

    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, module in quantized.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = quantize_roundtrip(module.weight.data, spec)
    quantized.save_pretrained(root / "quantized")
    return run, root / "quantized"


def reference_logits(quantized_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized_dir, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(model, adapter).eval(), ids)


def test_loftq_adapter_is_merged_into_the_4bit_base(residual_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.merge import merge_run

    run, quantized_dir = residual_run
    merged_dir = merge_run(run.path)
    ids = long_ids()[:, :64]
    expected = reference_logits(quantized_dir, run.adapter, ids)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    # What the merge did before: the adapter added to the full-precision weights.
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    doubled = logits(PeftModel.from_pretrained(full, run.adapter).merge_and_unload(), ids)
    got = logits(merged, ids)
    # float32 throughout: merged and reference differ by summation order only.
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert (doubled - expected).abs().max().item() > 100 * 1e-4


def test_loftq_adapter_is_served_on_the_4bit_base(residual_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.inference import attach_adapter

    run, quantized_dir = residual_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain_before = logits(base, long_ids()[:, :64])
    served = attach_adapter(base, run.adapter, "loftq", share_base=True)
    ids = long_ids()[:, :64]
    expected = reference_logits(quantized_dir, run.adapter, ids)
    got = logits(served, ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # The shared base still answers with its own full-precision weights.
    assert torch.equal(logits(base, ids), plain_before)


def test_vllm_refuses_an_adapter_fitted_to_the_4bit_base(residual_run, capsys):
    from {{ cookiecutter.package_name }}.cli import main

    run, _ = residual_run
    code = main(["serve", "--model", "org/model", "engine.kind=vllm", f"--adapter=q={run.adapter}"])
    err = capsys.readouterr().err
    assert code != 0
    assert "4-bit base (lora.init=loftq)" in err and "merge" in err
    assert "Traceback" not in err


# --- the device and dtype choice on a GPU ----------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees one CUDA device whose compute capability the test sets."""
    # Imported while torch still tells the truth: bitsandbytes (under the Trainer) sets up
    # its CUDA backend at import, which a faked device cannot serve.
    import bitsandbytes  # noqa: F401
    from transformers import PrinterCallback  # noqa: F401

    def install(capability: tuple[int, int], name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        # What torch answers on a T4 or V100: bf16 "supported", by emulation.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return install


def train_cli(model_dir: Path, tmp_path: Path, *overrides: str) -> tuple[int, Path]:
    """`train` through the CLI on the tiny model: its exit code, and the runs folder."""
    from {{ cookiecutter.package_name }}.cli import main
    from tickets import write_ticket_data

    data = write_ticket_data(tmp_path)
    out = tmp_path / "runs"
    code = main(
        [
            "train", "--config", str(CONFIG), f"model.name_or_path={model_dir}",
            f"data.train={data['train']}", "data.eval=null", f"output.dir={out}", *overrides,
        ]
    )  # fmt: skip
    return code, out


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
     ((9, 0), torch.bfloat16)],
)  # fmt: skip
def test_auto_dtype_is_fp16_below_compute_capability_8(fake_gpu, capability, expected):
    from {{ cookiecutter.package_name }}.device import pick_precision

    fake_gpu(capability)
    precision = pick_precision()
    assert (precision.device, precision.dtype) == ("cuda", expected)


def test_bf16_asked_for_on_a_gpu_without_it_is_one_clear_line(
    fake_gpu, tiny_model_dir, tmp_path, capsys
):
    fake_gpu((7, 5), "Tesla T4")
    code, out = train_cli(tiny_model_dir, tmp_path, "model.dtype=bfloat16", "output.run_name=bf16")
    err = capsys.readouterr().err
    assert code != 0
    assert "bfloat16" in err and "Tesla T4 is 7.5" in err and "float16" in err
    assert "Traceback" not in err
    assert not (out / "bf16").exists()  # nothing half-written in runs/


# --- the CPU suite on a machine with a GPU ---------------------------------------------------


def test_the_cpu_suite_hides_gpus_from_everything_it_starts():
    # conftest.py: every server, training run and subprocess of the CPU suite runs on the
    # CPU, whatever the machine has, so its expectations (cpu, float32) hold on a GPU host.
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def test_the_serve_tests_ask_for_the_cpu_where_a_gpu_is_visible(fake_gpu, tiny_model_dir):
    from {{ cookiecutter.package_name }}.device import pick_precision
    from {{ cookiecutter.package_name }}.serving.config import load_serve_config
    from test_serve import serve_overrides

    fake_gpu((9, 0))
    assert pick_precision().device == "cuda"  # the fake GPU is what `auto` would take
    serving = load_serve_config(None, serve_overrides(8000), model=str(tiny_model_dir))
    served = pick_precision(serving.model.device, serving.model.dtype)
    assert (served.device, served.dtype) == ("cpu", torch.float32)


def test_4bit_without_the_bitsandbytes_cuda_library_is_one_clear_line(
    fake_gpu, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from bitsandbytes import cextension

    fake_gpu((9, 0), "H100")
    missing = "libbitsandbytes_cuda129.so: cannot open shared object file"
    monkeypatch.setattr(cextension, "lib", cextension.ErrorHandlerMockBNBNativeLibrary(missing))
    code, out = train_cli(tiny_model_dir, tmp_path, "quantization.mode=4bit", "output.run_name=q")
    err = capsys.readouterr().err
    assert code != 0
    assert "bitsandbytes' CUDA library" in err and "libbitsandbytes_cuda129.so" in err
    assert "quantization.mode=none" in err and "Traceback" not in err
    assert not (out / "q").exists()
