"""The names of the server's Prometheus metrics, in a module of their own without imports.

serving/metrics.py registers them; the cost meter (cost/coldstart.py) reads them back from
/metrics, in an environment that may have neither prometheus-client nor torch.
"""

PREFIX = "llm"
REQUESTS = f"{PREFIX}_requests"
PROMPT_TOKENS = f"{PREFIX}_prompt_tokens"
COMPLETION_TOKENS = f"{PREFIX}_completion_tokens"
COST_USD = f"{PREFIX}_cost_usd"  # label: model; only with a price in the serve config
TIME_TO_FIRST_TOKEN = f"{PREFIX}_time_to_first_token_seconds"
E2E_LATENCY = f"{PREFIX}_e2e_request_latency_seconds"
REQUESTS_IN_FLIGHT = f"{PREFIX}_requests_in_flight"
ENGINE_PENDING = f"{PREFIX}_engine_pending_requests"
COLD_START = f"{PREFIX}_cold_start_seconds"  # label: phase
READY = f"{PREFIX}_ready"
COLD_START_PHASES = ("imports", "tokenizer", "weights", "adapters", "warmup", "ready")


def counter_sample(name: str) -> str:
    """The sample a counter exposes: prometheus-client appends _total to its name."""
    return f"{name}_total"
