"""Write the bundled sample dataset: support tickets routed to one of four teams.

The task is small enough for a tiny model to learn in seconds and for a 135M
instruct model to improve on visibly: before fine-tuning it answers in
sentences or picks the wrong team; after, it answers with the team name and
stops. Every sentence here was written for this project.

    python data/make_tickets.py      # rewrites tickets_train.jsonl and tickets_eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = (
    "You route customer support tickets. Answer with exactly one word, the team: "
    "billing, shipping, account or bug."
)
ISSUES = {
    "billing": [
        "I was charged twice for my {product} this month.",
        "My invoice {order} shows the wrong amount.",
        "Please refund the payment for order {order}.",
        "The subscription price went up without any notice.",
        "My credit card was billed after I cancelled the plan.",
        "I need a copy of the receipt for {order} for my taxes.",
        "Why did the renewal fee for {product} double?",
        "The discount code was not applied to my payment.",
    ],
    "shipping": [
        "My {product} has not arrived and the tracking number shows nothing.",
        "The parcel for order {order} arrived damaged.",
        "The courier left my package at the wrong address.",
        "Delivery of {order} is two weeks late.",
        "Can I change the delivery address for order {order}?",
        "The box was missing the {product} I ordered.",
        "Tracking says delivered but no package came.",
        "How long does shipping to another country take for {product}?",
    ],
    "account": [
        "I forgot my password and the reset email never comes.",
        "I am locked out of my account after too many login attempts.",
        "How do I change the email address on my profile?",
        "Two-factor codes are not accepted when I sign in.",
        "Please delete my account and all my personal data.",
        "I want to change my username to {name}.",
        "Someone else logged into my account from another city.",
        "I cannot verify my phone number on the profile page.",
    ],
    "bug": [
        "The {product} app crashes every time I open settings.",
        "Clicking the save button does nothing in version {version}.",
        "The page shows error 500 when I upload a photo.",
        "Since update {version} the screen freezes on startup.",
        "Sync between my phone and laptop fails with an error message.",
        "The search results page never finishes loading.",
        "Notifications stopped working after the last update of {product}.",
        "Dark mode makes the text invisible in the editor.",
    ],
}
OPENINGS = ["Hi,", "Hello team,", "Good morning.", "Hey,", "Dear support,", ""]
CLOSINGS = ["Thanks.", "Please help.", "Regards, {name}.", "This is urgent.", "Cheers!", ""]
PRODUCTS = ["headphones", "smart lamp", "fitness tracker", "e-reader", "kettle", "router"]
NAMES = ["Maya", "Tomasz", "Aiko", "Lars", "Fatima", "Diego", "Priya", "Kwame"]


def ticket(rng: random.Random, team: str) -> dict:
    fill = {
        "product": rng.choice(PRODUCTS),
        "order": f"#{rng.randint(10000, 99999)}",
        "name": rng.choice(NAMES),
        "version": f"{rng.randint(1, 9)}.{rng.randint(0, 20)}",
    }
    parts = [rng.choice(OPENINGS), rng.choice(ISSUES[team]), rng.choice(CLOSINGS)]
    text = " ".join(part for part in parts if part).format(**fill)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": team},
        ]
    }


def write(path: Path, count: int, seed: int, exclude: set[str] = frozenset()) -> set[str]:
    """Write ``count`` tickets, balanced over teams, none whose text is in ``exclude``."""
    rng = random.Random(seed)
    teams = list(ISSUES)
    records: list[dict] = []
    texts: set[str] = set()
    while len(records) < count:
        record = ticket(rng, teams[len(records) % len(teams)])
        text = record["messages"][1]["content"]
        if text not in exclude:
            records.append(record)
            texts.add(text)
    rng.shuffle(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return texts


if __name__ == "__main__":
    here = Path(__file__).parent
    seen = write(here / "tickets_train.jsonl", 400, seed=1)
    # Held out: no eval ticket text appears in the training file.
    write(here / "tickets_eval.jsonl", 80, seed=2, exclude=seen)
