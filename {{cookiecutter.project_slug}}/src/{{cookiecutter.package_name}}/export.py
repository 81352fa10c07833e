"""Export a run for llama.cpp and Ollama: GGUF files written by llama.cpp's own converter,
and an Ollama Modelfile beside them.

    runs/<run>/gguf/<run>-f16.gguf     one file per type, the chat template embedded
    runs/<run>/gguf/<run>-q8_0.gguf
    runs/<run>/gguf/Modelfile          `ollama create <name> -f Modelfile`

The tensor names, the vocabulary and the metadata are the converter's business
(convert_hf_to_gguf.py and its `conversion` package); this module only finds the
converter, runs it on the merged model and reports what it says. The folder is written
under a scratch name and renamed, so it is either complete or absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import Message, render
from .errors import UserError
from .runs import PROGRAM, RunFolder

# The converter's --outtype choices that apply to any model (tq1_0/tq2_0 are for ternary
# models only). Other types (q4_k_m, ...) are made from the f16 file by llama-quantize.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPES = ("f16", "q8_0")

# llama.cpp publishes the converter in its source tree, not on PyPI. The sdist of
# llama-cpp-python vendors one llama.cpp commit whole: convert_hf_to_gguf.py, its
# `conversion` package and the `gguf` package (gguf-py) of the same commit, which the
# converter puts first on its path. It needs that copy: the converter follows gguf-py's
# main branch, and with the `gguf` release on PyPI (0.19.0) it fails mid-write
# (no gguf.LazyChunkedTensor). Reading GGUF back (transformers, tests) uses the release.
LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py", "LICENSE")


@dataclass(frozen=True)
class GgufOptions:
    run: Path
    types: tuple[str, ...] = DEFAULT_TYPES
    out: Path | None = None  # default: <run>/gguf
    llama_cpp: Path | None = None  # a llama.cpp checkout; default: $LLAMA_CPP_DIR or the cache
    name: str | None = None  # file name stem and Ollama model name; default: the run's name


@dataclass(frozen=True)
class GgufExport:
    folder: Path
    files: dict[str, Path]  # GGUF type -> file
    modelfile: Path


def check_types(types: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [kind for kind in types if kind not in GGUF_TYPES]
    if unknown:
        raise UserError(
            f"unknown GGUF type {unknown[0]!r}: llama.cpp's converter writes "
            f"{', '.join(GGUF_TYPES)}; for k-quants (q4_k_m, ...) run llama.cpp's "
            "llama-quantize on the f16 file"
        )
    if not types:
        raise UserError(f"give at least one GGUF type, e.g. --type {DEFAULT_TYPES[0]}")
    return tuple(dict.fromkeys(types))


def converter_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return root / PROGRAM / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def find_converter(llama_cpp: Path | None) -> Path:
    """convert_hf_to_gguf.py from a given llama.cpp checkout, $LLAMA_CPP_DIR, or the cache
    (filled from llama-cpp-python's sdist on first use)."""
    given = llama_cpp or (
        Path(os.environ["LLAMA_CPP_DIR"]) if "LLAMA_CPP_DIR" in os.environ else None
    )
    folder = given or converter_cache()
    if (folder / CONVERTER).is_file():
        return folder / CONVERTER
    if given is not None:
        raise UserError(
            f"{given} has no {CONVERTER}; give the folder of a llama.cpp checkout "
            "(git clone https://github.com/ggml-org/llama.cpp), or leave out --llama-cpp "
            "and LLAMA_CPP_DIR to use the pinned copy"
        )
    fetch_converter(folder)
    return folder / CONVERTER


def fetch_converter(folder: Path) -> None:
    """Download llama-cpp-python's sdist with pip and keep only the converter's parts."""
    print(f"fetching llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON} sdist) once")
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"),
            *(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", scratch, "--quiet"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            reason = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise UserError(
                f"cannot download llama.cpp's converter ({reason}); run once with access to "
                "PyPI, or give a llama.cpp checkout with --llama-cpp DIR (or LLAMA_CPP_DIR)"
            )
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        # The "data" filter refuses links out of the folder and absolute paths (Python
        # 3.10.12+ and 3.11.4+; older patch releases extract the listed parts as they are).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(archives[0]) as archive:
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            for member in archive.getmembers():
                inner = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and inner.split("/")[0] in CONVERTER_PARTS:
                    member.name = inner
                    archive.extract(member, partial, **safe)  # type: ignore[arg-type]
        if not (partial / CONVERTER).is_file():
            shutil.rmtree(partial)
            raise UserError(f"{archives[0].name} holds no vendor/llama.cpp/{CONVERTER}")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)


def converter_error(stderr: str) -> str:
    """The line of the converter's output that says why it stopped."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line.split(":", 2)[-1].strip()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|NotImplemented\w*)\b", line):
            return line
    return lines[-1] if lines else "no output"


def convert(converter: Path, model: Path, outfile: Path, kind: str) -> None:
    command = [
        sys.executable, str(converter), str(model), "--outfile", str(outfile), "--outtype", kind,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    # The converter logs an unsupported architecture and exits 0 without a file.
    if done.returncode != 0 or not outfile.is_file():
        raise UserError(
            f"llama.cpp's converter cannot convert {model} to {kind}: "
            f"{converter_error(done.stderr + done.stdout)}"
        )


@dataclass(frozen=True)
class TurnFormat:
    """The chat template as Ollama's Go template needs it: the text around each role's
    content, the generation prompt, and a default system message if the template adds one."""

    wrap: dict[str, tuple[str, str]]
    generation_prompt: str
    default_system: str | None


MARK = "\x00{}\x00"


def turn_format(tokenizer: Any) -> TurnFormat:
    """Derive each role's wrapper by rendering the model's own template around a marker.

    Ollama reads Go templates, and nothing translates Jinja chat templates into them; a
    template whose turns are not plain wrappers (tools, content-dependent branches) is
    refused by `go_template`'s check rather than exported wrong.
    """

    def rendered(messages: list[Message], generation: bool = False) -> str:
        return render(tokenizer, messages, add_generation_prompt=generation)

    system = {"role": "system", "content": MARK.format("s")}
    head = rendered([system])
    wrap = {"system": tuple(head.split(MARK.format("s")))}
    for role in ("user", "assistant"):
        text = rendered([system, {"role": role, "content": MARK.format(role)}])
        if not text.startswith(head):
            raise UserError(
                "the chat template renders the system turn differently when a turn follows, "
                "so no Ollama TEMPLATE equals it; nothing was exported"
            )
        wrap[role] = tuple(text[len(head) :].split(MARK.format(role)))
    user = [system, {"role": "user", "content": MARK.format("user")}]
    generation_prompt = rendered(user, generation=True)[len(rendered(user)) :]
    alone = rendered([{"role": "user", "content": MARK.format("user")}])
    user_turn = MARK.format("user").join(wrap["user"])
    default_system = None
    before = alone.removesuffix(user_turn)
    prefix, suffix = wrap["system"]
    if before and before.startswith(prefix) and before.endswith(suffix):
        default_system = before[len(prefix) : len(before) - len(suffix)]
    pairs = {role: (pair[0], pair[1]) for role, pair in wrap.items() if len(pair) == 2}
    if len(pairs) != 3:
        raise UserError(
            "the chat template repeats a message's content, so no Ollama TEMPLATE equals it; "
            "nothing was exported"
        )
    return TurnFormat(pairs, generation_prompt, default_system)


# Go template delimiters, spelled out: this file is itself rendered by a template engine.
OPEN, CLOSE = "{" * 2, "}" * 2


def go_template(turns: TurnFormat) -> str:
    """Ollama's TEMPLATE for these turns (Go text/template over .Messages)."""

    def action(body: str) -> str:  # no whitespace trimming: the turns' newlines are kept
        return f"{OPEN} {body} {CLOSE}"

    def literal(text: str) -> str:  # template text that holds a delimiter
        return text.replace(OPEN, f'{OPEN} "{OPEN}" {CLOSE}')

    branches = "".join(
        action(f'{"if" if index == 0 else "else if"} eq .Role "{role}"')
        + f"{literal(prefix)}{OPEN} .Content {CLOSE}{literal(suffix)}"
        for index, (role, (prefix, suffix)) in enumerate(turns.wrap.items())
    )
    return (
        action("range .Messages") + branches + action("end") + action("end")
        + literal(turns.generation_prompt)
    )  # fmt: skip


def apply_turns(turns: TurnFormat, messages: list[Message]) -> str:
    """What Ollama renders from `go_template` for these messages: checks the derivation."""
    if turns.default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": turns.default_system}, *messages]
    text = "".join(
        turns.wrap[m["role"]][0] + m["content"] + turns.wrap[m["role"]][1] for m in messages
    )
    return text + turns.generation_prompt


def stop_tokens(tokenizer: Any, turns: TurnFormat, eos_ids: list[int]) -> list[str]:
    """EOS and every special token that ends an assistant turn or opens the next one."""
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids]
    edges = turns.wrap["assistant"][1] + turns.wrap["user"][0]
    stops += [token for token in sorted(special, key=edges.find) if token and token in edges]
    return list(dict.fromkeys(str(s) for s in stops if s))


def modelfile(tokenizer: Any, gguf_name: str, eos_ids: list[int]) -> str:
    """The Ollama Modelfile: FROM the GGUF file, the template, a default system prompt if
    the template adds one, and the stop tokens."""
    sample: list[Message] = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye"},
    ]
    try:
        turns = turn_format(tokenizer)
        expected = render(tokenizer, sample, add_generation_prompt=True)
    except UserError:
        raise
    except Exception as error:  # jinja's errors, and the template's own raise_exception()
        raise UserError(
            f"the chat template cannot be written as an Ollama TEMPLATE ({error}); nothing was "
            "exported. Give the tokenizer a template that renders system, user and assistant "
            "turns"
        ) from None
    if apply_turns(turns, sample) != expected:
        raise UserError(
            "the chat template is not a plain wrapper around each turn, so no Ollama TEMPLATE "
            "equals it; nothing was exported. Give the tokenizer a simpler template"
        )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(turns)}"""']
    if turns.default_system is not None:
        lines.append(f'SYSTEM """{turns.default_system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_tokens(tokenizer, turns, eos_ids)]
    return "\n".join(lines) + "\n"


def export_gguf(options: GgufOptions) -> GgufExport:
    """GGUF files of the merged run (merged first when it is not) and a Modelfile."""
    from tqdm.auto import tqdm

    from .merge import merge_run
    from .modeling import load_tokenizer

    types = check_types(options.types)
    run = RunFolder(options.run)
    config = run.read_config()
    if not (run.merged / "config.json").is_file():
        print(f"{run.merged} does not exist: merging the adapter first")
        merge_run(run.path)
    name = options.name or run.name
    # The Modelfile first: a template it cannot express stops the export before it starts.
    tokenizer = load_tokenizer(str(run.merged), config.model.trust_remote_code)
    ollama = modelfile(tokenizer, f"{name}-{types[0]}.gguf", _eos_ids(run.merged, tokenizer))
    converter = find_converter(options.llama_cpp)
    out = options.out or run.gguf
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        files = {}
        for kind in tqdm(types, desc="gguf", unit="file"):
            files[kind] = partial / f"{name}-{kind}.gguf"
            convert(converter, run.merged, files[kind], kind)
        (partial / "Modelfile").write_text(ollama, encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return GgufExport(
        out, {kind: out / path.name for kind, path in files.items()}, out / "Modelfile"
    )


def _eos_ids(model: Path, tokenizer: Any) -> list[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def export_command(options: GgufOptions) -> int:
    result = export_gguf(options)
    for kind, path in result.files.items():
        print(f"{kind:>5}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"Ollama: cd {result.folder} && ollama create <name> -f Modelfile")
    return 0
