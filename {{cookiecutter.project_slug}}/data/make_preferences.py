"""Write the bundled preference task: the ticket-routing tickets as DPO pairs.

Each pair holds the ticket as the prompt (the system message and the user's ticket), the
right team as the chosen answer and another team, picked at random, as the rejected one.
It is derived from tickets_{train,eval}.jsonl, so the held-out pairs stay held out.

    python data/make_preferences.py  # rewrites preferences_train.jsonl and preferences_eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEAMS = ("billing", "shipping", "account", "bug")


def pairs(tickets: Path, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for line in tickets.read_text(encoding="utf-8").splitlines()[:count]:
        *prompt, answer = json.loads(line)["messages"]
        wrong = rng.choice([team for team in TEAMS if team != answer["content"]])
        records.append(
            {
                "prompt": prompt,
                "chosen": [answer],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return records


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    write(here / "preferences_train.jsonl", pairs(here / "tickets_train.jsonl", 200, seed=3))
    write(here / "preferences_eval.jsonl", pairs(here / "tickets_eval.jsonl", 40, seed=4))
