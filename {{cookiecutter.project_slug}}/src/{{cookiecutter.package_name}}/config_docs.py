"""Config keys are documented once, on the pydantic fields (`Field(description=...)`).

From there `--help` lists every key with its type and default, and the comments of the
YAML files in configs/ are checked against (or rewritten from) the same descriptions:
this module run with `python -m` rewrites them, `--check` only reports.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel

from .config_keys import KeyDoc, key_docs

# A key's trailing comment starts at this column when its code is shorter, as the YAML
# files in configs/ are laid out; a description that would make the line longer than
# LINE_WIDTH goes above the key instead, wrapped at WRAP_WIDTH.
COMMENT_COLUMN = 27
LINE_WIDTH = 100
WRAP_WIDTH = 92


def describe_keys(schema: type[BaseModel], width: int = 88) -> str:
    """The keys of a config as `--help` ends with them, grouped by section."""
    lines: list[str] = []
    for doc in key_docs(schema):
        indent = "  " * doc.key.count(".")
        if not indent:
            lines.append("")  # a blank line before each section and top-level key
        if doc.section:
            lines += _wrapped(f"{doc.key}: {doc.description}", width, indent, indent + "    ")
            continue
        default = ", required" if doc.default is None else f" = {doc.default}"
        lines.append(f"{indent}{doc.key}: {doc.type}{default}")
        lines += _wrapped(doc.description, width, indent + "    ", indent + "    ")
    return "\n".join(lines).lstrip("\n")


def _wrapped(text: str, width: int, first: str, then: str) -> list[str]:
    return textwrap.wrap(
        text, width, initial_indent=first, subsequent_indent=then, break_on_hyphens=False
    )


@dataclass(frozen=True)
class YamlKey:
    """A key as a YAML file writes it: its line (from 0), and its comment: the one after
    it on its line, else the comment lines right above it at its indentation."""

    key: str
    line: int
    comment: str | None
    above: int  # comment lines above it that are its comment (0 with a trailing one)


def yaml_keys(text: str) -> list[YamlKey]:
    """Every mapping key of a YAML text, in order, with its comment."""
    lines = text.splitlines()
    return [_with_comment(key, node, lines) for key, node in _mapping_keys(yaml.compose(text), "")]


def _mapping_keys(node: yaml.Node | None, prefix: str) -> Iterator[tuple[str, yaml.Node]]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + str(key_node.value)
            yield key, key_node
            yield from _mapping_keys(value_node, key + ".")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _mapping_keys(item, prefix.removesuffix(".") + "[].")


def _with_comment(key: str, node: yaml.Node, lines: list[str]) -> YamlKey:
    number = node.start_mark.line
    trailing = split_comment(lines[number])[1]
    if trailing is not None:
        return YamlKey(key, number, trailing, above=0)
    marker = " " * node.start_mark.column + "#"
    above = 0
    while number - above > 0 and lines[number - above - 1].startswith(marker):
        above += 1
    block = [line.strip().removeprefix("#").strip() for line in lines[number - above : number]]
    return YamlKey(key, number, " ".join(block) or None, above=above)


def split_comment(line: str) -> tuple[str, str | None]:
    """A line's code and its trailing comment (None without one); a # inside quotes or
    not after a space is part of the value, as YAML reads it."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip(), line[index + 1 :].strip()
    return line.rstrip(), None


def _same(comment: str | None, description: str) -> bool:
    return " ".join((comment or "").split()) == " ".join(description.split())


def _checked(schema: type[BaseModel], text: str) -> tuple[dict[str, KeyDoc], list[YamlKey]]:
    """The schema's keys, and the YAML keys that are keys of it (not data inside a field
    that holds a mapping, such as adapters: {NAME: PATH})."""
    docs = {doc.key: doc for doc in key_docs(schema)}

    def is_data(key: str) -> bool:
        parts = key.split(".")
        prefixes = (".".join(parts[:end]) for end in range(1, len(parts)))
        return any(prefix in docs and not docs[prefix].section for prefix in prefixes)

    return docs, [found for found in yaml_keys(text) if not is_data(found.key)]


def check_yaml(schema: type[BaseModel], text: str, name: str) -> list[str]:
    """What disagrees between a YAML config and its schema: keys that are no field, fields
    missing from a section the file lists, and comments that are not the field's
    description (the keys of list items are checked for existence only: they are data)."""
    docs, found = _checked(schema, text)
    problems = []
    for item in found:
        doc = docs.get(item.key)
        where = f"{name}:{item.line + 1}: {item.key}"
        if doc is None:
            problems.append(f"{where} is no key of {schema.__name__}; remove it or add the field")
        elif "[]" not in item.key and not _same(item.comment, doc.description):
            problems.append(f"{where}: its comment must be its description: {doc.description}")
    listed = {item.key for item in found}
    sections = {item.key.rpartition(".")[0] for item in found}
    for doc in docs.values():
        if "[]" not in doc.key and doc.key.rpartition(".")[0] in sections and doc.key not in listed:
            problems.append(f"{name}: {doc.key} is missing; add it (default: {doc.default})")
    return problems


def write_comments(schema: type[BaseModel], text: str) -> str:
    """The YAML text with each key's comment set to its field's description: after the
    key where it fits on the line, else above it. Values and other comments are kept."""
    docs, found = _checked(schema, text)
    lines = text.splitlines()
    for item in reversed(found):  # from the bottom, so inserted lines move nothing unseen
        doc = docs.get(item.key)
        if doc is None or "[]" in item.key:
            continue
        code = split_comment(lines[item.line])[0]
        lines[item.line - item.above : item.line + 1] = _documented(code, doc.description)
    return "\n".join(lines) + "\n"


def _documented(code: str, description: str) -> list[str]:
    beside = f"{code}{' ' * max(2, COMMENT_COLUMN - len(code))}# {description}"
    if len(beside) <= LINE_WIDTH:
        return [beside]
    indent = code[: len(code) - len(code.lstrip())]
    width = WRAP_WIDTH - len(indent) - 2
    return [f"{indent}# {part}" for part in textwrap.wrap(description, width)] + [code]


def config_files() -> dict[str, type[BaseModel]]:
    """The YAML configs of the project, by path from its root, and their schemas."""
    from .config import Config
    from .cost.config import TokenCostConfig
    from .serving.config import ServeConfig

    return {
        "configs/train.yaml": Config,
        "configs/serve.yaml": ServeConfig,
        "configs/token_cost.yaml": TokenCostConfig,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}",
        description="Rewrite the comments of configs/*.yaml from the fields' descriptions.",
    )
    parser.add_argument("--check", action="store_true", help="only report what disagrees")
    parser.add_argument("--root", type=Path, default=Path(), help="the project folder")
    args = parser.parse_args(argv)
    action: Callable[[Path, type[BaseModel]], list[str]] = _report if args.check else _rewrite
    problems = [
        problem
        for name, schema in config_files().items()
        for problem in action(args.root / name, schema)
    ]
    print("\n".join(problems) or "the config files agree with their fields", file=sys.stderr)
    return 1 if problems else 0


def _report(path: Path, schema: type[BaseModel]) -> list[str]:
    return check_yaml(schema, path.read_text(encoding="utf-8"), str(path))


def _rewrite(path: Path, schema: type[BaseModel]) -> list[str]:
    path.write_text(write_comments(schema, path.read_text(encoding="utf-8")), encoding="utf-8")
    return _report(path, schema)


if __name__ == "__main__":
    sys.exit(main())
