"""Config keys are documented once, on the fields: every field has a description, `--help`
lists every key, and the YAML comments and the README's keys agree with the fields."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import cli_help
from {{ cookiecutter.package_name }}.config_docs import (
    check_yaml,
    config_files,
    describe_keys,
    key_docs,
    write_comments,
)
from {{ cookiecutter.package_name }}.cost.config import ReferencePrices

PROJECT = Path(__file__).resolve().parents[1]
REWRITE = "python -m {{ cookiecutter.package_name }}.config_docs"
COMMANDS = {
    "train": "configs/train.yaml",
    "serve": "configs/serve.yaml",
    "token-cost": "configs/token_cost.yaml",
}
# Dotted names in the README that are not config keys: transformers' own method, and the
# mistyped key of the error message it shows.
NOT_KEYS = {"model.init_continuous_batching", "lora.rank"}
FILE_NAME = re.compile(r"\.(json|jsonl|yaml|md|png|py|txt|parquet|safetensors|gguf)$")


def all_keys() -> set[str]:
    return {doc.key for schema in config_files().values() for doc in key_docs(schema)}


@pytest.mark.parametrize("schema", [*config_files().values(), ReferencePrices])
def test_every_field_has_a_description(schema: type[BaseModel]):
    undocumented = [doc.key for doc in key_docs(schema) if not doc.description.strip()]
    assert not undocumented, f"give these fields Field(description=...): {undocumented}"


@pytest.mark.parametrize("name", sorted(config_files()))
def test_yaml_keys_and_comments_agree_with_the_fields(name: str):
    text = (PROJECT / name).read_text(encoding="utf-8")
    problems = check_yaml(config_files()[name], text, name)
    assert not problems, (
        "\n".join(problems) + f"\n(`{REWRITE}` rewrites the comments from the fields; keys "
        "that are no field, or fields missing from the file, are yours to fix)"
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_key_with_its_default_without_importing_torch(command: str):
    text = cli_help(command)
    schema = config_files()[COMMANDS[command]]
    assert describe_keys(schema) in text
    for doc in key_docs(schema):
        assert f"{doc.key}: " in text, doc.key


def test_help_shows_type_bounds_default_and_description():
    text = describe_keys(config_files()["configs/train.yaml"])
    assert "  lora.r: int (>= 1, <= 1024) = 16\n      rank of the adapter's update matrices" in text
    assert "  model.name_or_path: str, required\n" in text
    assert "\nlora: the adapter (peft's LoraConfig)\n" in text


def test_readme_names_only_real_keys():
    keys = all_keys()
    sections = {key.split(".")[0].removesuffix("[]") for key in keys}
    named = set()
    for quoted in re.findall(r"`([^`\n]+)`", (PROJECT / "README.md").read_text(encoding="utf-8")):
        match = re.match(r"^([a-z_]+(?:\.[a-z_0-9]+)+)(?:\s*[=:].*)?$", quoted)
        if match and match[1].split(".")[0] in sections and not FILE_NAME.search(match[1]):
            named.add(match[1])
    assert named, "the README names no config key: has the pattern gone stale?"
    unknown = sorted(named - keys - NOT_KEYS)
    assert not unknown, f"the README names keys no config has: {unknown}; fix the README"


SCHEMA_TEXT = """\
# a header, kept
lora:                      # the adapter (peft's LoraConfig)
  r: 8                     # old words
  # old words above
  alpha: 16
  dropout: 0.1
# an example, kept:
#  dropout: 0.2
"""


def train_schema() -> type[BaseModel]:
    return config_files()["configs/train.yaml"]


def test_the_check_names_wrong_comments_unknown_and_missing_keys():
    text = SCHEMA_TEXT.replace("  dropout: 0.1\n", "  rank: 4  # nothing\n")
    problems = "\n".join(check_yaml(train_schema(), text, "x.yaml"))
    assert "x.yaml:3: lora.r: its comment must be its description" in problems
    assert "x.yaml:5: lora.alpha: its comment" in problems
    assert "x.yaml:6: lora.rank is no key of Config" in problems
    assert "lora.dropout is missing" in problems and "lora.use_dora is missing" in problems
    assert "model is missing" in problems  # a top-level section the file leaves out


def test_rewriting_sets_descriptions_and_keeps_values_and_other_comments():
    written = write_comments(train_schema(), SCHEMA_TEXT)
    assert written.startswith("# a header, kept\n")
    assert "  r: 8                     # rank of the adapter's update matrices\n" in written
    assert "  alpha: 16                # scale of the update: alpha / r\n" in written
    assert "old words" not in written
    assert written.endswith("# an example, kept:\n#  dropout: 0.2\n")
    assert write_comments(train_schema(), written) == written
    problems = check_yaml(train_schema(), written, "x.yaml")
    assert not [problem for problem in problems if "its comment" in problem]


def test_a_long_description_goes_above_its_key_and_still_counts():
    text = "data:\n  packing_strategy: wrapped\n"
    written = write_comments(config_files()["configs/train.yaml"], text)
    lines = written.splitlines()
    assert lines[-1] == "  packing_strategy: wrapped" and lines[-2].startswith("  # ")
    assert max(len(line) for line in lines) <= 100
    problems = check_yaml(config_files()["configs/train.yaml"], written, "x.yaml")
    assert not [problem for problem in problems if "packing_strategy:" in problem]


def test_mapping_values_and_list_items_are_data_not_keys():
    text = (
        "server:                    # our server, when endpoint.url is null\n"
        "  adapters:                 # NAME: runs/<run>/adapter, served next to the base\n"
        "    support: runs/a/adapter\n"
        "engines:\n"
        "  - {name: ours, serve: [engine.kind=vllm]}\n"
        "  - {name: theirs, colour: red}\n"
    )
    problems = check_yaml(config_files()["configs/token_cost.yaml"], text, "x.yaml")
    assert not [problem for problem in problems if "adapters.support" in problem]
    assert [problem for problem in problems if "engines[].colour is no key" in problem]
    assert not [problem for problem in problems if "engines[].name" in problem]


def test_an_unknown_key_in_a_list_item_names_the_keys_of_its_items():
    from {{ cookiecutter.package_name }}.cost.config import load_token_cost_config
    from {{ cookiecutter.package_name }}.errors import UserError

    with pytest.raises(UserError) as error:
        load_token_cost_config(None, ["engines=[{name: a, nme: b}, {name: c}]"])
    assert "engines.0.nme: unknown key; did you mean 'engines[].name'? (valid here: name, url," in (
        str(error.value)
    )
