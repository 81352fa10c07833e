"""Validate every cookiecutter variable before a single file is written.

Values are inserted with ``tojson`` so that quotes, backslashes or code in a
value stay data: they can never change this script.  A failure prints the
variable, the value and a good example, and exits non-zero; cookiecutter then
removes the output folder it had started.
"""

import keyword
import math
import re
import sys

VALUES = {
    "project_name": {{ cookiecutter.project_name | tojson }},
    "project_slug": {{ cookiecutter.project_slug | tojson }},
    "package_name": {{ cookiecutter.package_name | tojson }},
    "description": {{ cookiecutter.description | tojson }},
    "author_name": {{ cookiecutter.author_name | tojson }},
    "author_email": {{ cookiecutter.author_email | tojson }},
    "license": {{ cookiecutter.license | tojson }},
    "python_version": {{ cookiecutter.python_version | tojson }},
    "base_model": {{ cookiecutter.base_model | tojson }},
    "torch_backend": {{ cookiecutter.torch_backend | tojson }},
    "gpu_hourly_usd": {{ cookiecutter.gpu_hourly_usd | tojson }},
    "github_owner": {{ cookiecutter.github_owner | tojson }},
    "gpu_runner_labels": {{ cookiecutter.gpu_runner_labels | tojson }},
}

# Import names the generated project depends on; a package named like one of
# them would shadow it.
SHADOWED = {
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
    "safetensors", "yaml", "pydantic", "fastapi", "uvicorn", "openai", "numpy",
    "tests", "test", "src",
}

SLUG = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
PACKAGE = re.compile(r"[a-z][a-z0-9_]*")
EMAIL = re.compile(r"[^@\s\"'<>\\]+@[^@\s\"'<>\\]+\.[A-Za-z]{2,}")
HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
LOCAL_PATH = re.compile(r"(/|\./|\.\./|~/)[^\x00-\x1f\"'\\]*")
GITHUB_OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
RUNNER_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CHOICES = {
    "license": ["MIT", "Apache-2.0", "BSD-3-Clause", "Proprietary"],
    "python_version": ["3.11", "3.12", "3.10"],
    "torch_backend": ["cu128", "cu126", "cu130", "cpu"],
}


def _one_line(value: str) -> bool:
    return bool(value.strip()) and not any(ord(c) < 32 or ord(c) == 127 for c in value)


def _price_ok(value: str) -> bool:
    try:
        price = float(value)
    except ValueError:
        return False
    return math.isfinite(price) and 0 < price <= 1000


def _labels_ok(value: str) -> bool:
    labels = [label.strip() for label in value.split(",")]
    return bool(labels) and all(RUNNER_LABEL.fullmatch(label) for label in labels)


def _package_ok(value: str) -> bool:
    return (
        bool(PACKAGE.fullmatch(value))
        and not keyword.iskeyword(value)
        and value not in sys.stdlib_module_names
        and value not in SHADOWED
    )


# variable -> (is it valid?, what a valid value looks like, an example)
RULES = {
    "project_name": (_one_line, "a non-empty single line", "LoRA Chat"),
    "project_slug": (
        lambda v: bool(SLUG.fullmatch(v)) and len(v) <= 64,
        "lowercase letters, digits and single hyphens, starting with a letter",
        "lora-chat",
    ),
    "package_name": (
        _package_ok,
        "a lowercase Python identifier that is not a keyword, a standard-library "
        "module or a dependency",
        "lora_chat",
    ),
    "description": (_one_line, "a non-empty single line", "Fine-tune and serve a chat model"),
    "author_name": (_one_line, "a non-empty single line", "Ada Lovelace"),
    "author_email": (lambda v: bool(EMAIL.fullmatch(v)), "an email address", "ada@example.com"),
    "base_model": (
        lambda v: bool(HF_ID.fullmatch(v) or LOCAL_PATH.fullmatch(v)),
        "a Hugging Face id 'org/name' or a local path starting with / ./ ../ or ~/",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gpu_hourly_usd": (_price_ok, "a price in USD above 0 and at most 1000", "2.50"),
    "github_owner": (
        lambda v: bool(GITHUB_OWNER.fullmatch(v)),
        "a GitHub user or organisation name (letters, digits, single hyphens)",
        "my-org",
    ),
    "gpu_runner_labels": (
        _labels_ok,
        "comma-separated runner labels of letters, digits, '.', '_' or '-'",
        "self-hosted, linux, x64, gpu",
    ),
}
for name, choices in CHOICES.items():
    RULES[name] = (choices.__contains__, "one of " + ", ".join(choices), choices[0])


def main() -> int:
    errors = []
    for name, value in VALUES.items():
        valid, expected, example = RULES[name]
        if not valid(value):
            errors.append(
                f"  {name}={value!r} is not valid: expected {expected}.\n"
                f"    Example: {name}={example!r}"
            )
    if errors:
        print("cookiecutter-lora: cannot generate the project:", file=sys.stderr)
        print("\n".join(errors), file=sys.stderr)
        print(
            "Fix the value(s) above, e.g. cookiecutter <template> --no-input "
            "project_slug=lora-chat",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
