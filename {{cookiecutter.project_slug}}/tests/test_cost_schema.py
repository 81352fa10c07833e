"""cost_card.schema.json is generated from the card's models (cost/schema.py), never edited."""

from __future__ import annotations

import json

import jsonschema

from {{ cookiecutter.package_name }}.cost.schema import SCHEMA_PATH, CostCard, schema_text

REGENERATE = "python -m {{ cookiecutter.package_name }}.cost.schema"


def test_committed_schema_is_the_one_the_models_generate():
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == schema_text(), (
        f"{SCHEMA_PATH.name} differs from the models in cost/schema.py; regenerate it with "
        f"`{REGENERATE}`"
    )


def test_schema_is_a_valid_draft_2020_12_schema_that_keeps_the_partial_rule():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == "cost_card.schema.json" and schema["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(schema)
    fields = {"partial": True, "partial_reasons": []}
    errors = [e for e in validator.iter_errors(fields) if "partial_reasons" in e.json_path]
    assert errors, "a partial card without reasons must break the schema"
    # The models refuse it the same way.
    assert "partial_reasons" in str(CostCard.model_fields) and schema["title"] == "Cost card"
