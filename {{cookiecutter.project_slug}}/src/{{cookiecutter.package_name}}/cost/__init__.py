"""Token cost: what a token costs to serve and to train, measured rather than assumed.

`token-cost` (cli) -> command.py: target.py picks what to drive (our server, started by
the meter, or any OpenAI-compatible URL) and asks it what it runs on (GET /info); sweep.py
times cold start (coldstart.py), runs the load sweep (load.py), each model's part of a
traffic mix, and the quality scoring (quality.py); money.py turns the numbers into dollars,
training_cost.py reads training runs, and card.py writes a cost card made of the typed
records of schema.py. money.py and training_cost.py are pure Python, so the maths is tested
without a model; nothing here imports torch on the way to metering a URL.
"""
