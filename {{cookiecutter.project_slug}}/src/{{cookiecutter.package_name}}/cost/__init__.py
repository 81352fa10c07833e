"""Token cost: what a token costs to serve and to train, measured rather than assumed.

`token-cost` (cli) -> command.py: starts our server (or drives any OpenAI-compatible URL)
and asks it what it runs on (GET /info), times cold start (coldstart.py), runs a load sweep
(load.py), turns the numbers into dollars (money.py), reads training runs (training.py)
and writes a cost card (card.py) made of the typed records of schema.py. money.py and
training.py are pure Python, so the maths is tested without a model; nothing here imports
torch on the way to metering a URL.
"""
