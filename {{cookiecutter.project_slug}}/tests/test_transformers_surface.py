"""The upgrade canary: what serving/batching.py takes from transformers' continuous-batching
internals is still there. Seconds, not a served request, to learn that an upgrade moved
one; each failure names the transformers version and the missing piece."""

from __future__ import annotations

import transformers

from {{ cookiecutter.package_name }}.serving import batching


def test_every_class_level_piece_is_there():
    assert batching.missing_surface() == []


def test_a_missing_piece_is_named_with_the_version(monkeypatch):
    gone = batching.Surface("ContinuousBatchingManager", ("add_request",), lambda: False)
    monkeypatch.setattr(batching, "LIBRARY_SURFACE", (gone,))
    assert batching.missing_surface() == [
        f"transformers {transformers.__version__}: ContinuousBatchingManager no longer has "
        "add_request (serving/batching.py relies on it)"
    ]


def test_a_manager_has_the_attributes_it_is_read_through(tiny_model_dir):
    """Set in __init__ or at start, so checked on a real (tiny) manager, started and stopped."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cb = batching.ContinuousBatchingConfig(num_blocks=4, page_size=16, max_batch_tokens=32)
    loop = batching.BatchingLoop(model, [0], 0, cb)
    manager = loop._manager
    missing = [name for name in batching.MANAGER_ATTRIBUTES if not hasattr(manager, name)]
    assert not missing, f"transformers {transformers.__version__}: the manager lacks {missing}"
    router = manager.output_router
    assert hasattr(router, "_lock") and isinstance(router.result_handlers, dict)
    assert hasattr(manager.background_thread_status, "fatal_error")
    loop.start()
    try:
        scheduler = manager.batch_processor.scheduler
        assert hasattr(scheduler, "active_requests") and hasattr(scheduler, "waiting_requests")
        assert loop.pending() == 0 and loop.fatal_error() is None
        loop.run_once("surface", [1, 2, 3], timeout_s=60)
    finally:
        loop.stop(5)


def _greedy_answers(model, cb, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Serve the prompts one after another; the answers, and the prefix tokens each reused."""
    import asyncio

    loop = batching.BatchingLoop(model, [0], 0, cb)
    loop.start()
    cache = loop._manager.batch_processor.cache
    reused: list[int] = []
    search = cache.search_prefix_match

    def recorded_search(request_id, prompt_ids):
        reused.append(search(request_id, prompt_ids))
        return reused[-1]

    cache.search_prefix_match = recorded_search

    async def answer(request_id: str, prompt: list[int]) -> list[int]:
        # The library calls a result handler on the asyncio loop that registered it.
        finished: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_output(output):
            if output.is_finished() and not finished.done():
                finished.set_result(output)

        assert loop.add(request_id, prompt, 8, [0], on_output, {})
        output = await asyncio.wait_for(finished, 60)
        assert output.error is None
        return list(output.generated_tokens)

    try:
        answers = [asyncio.run(answer(f"r{i}", prompt)) for i, prompt in enumerate(prompts)]
    finally:
        loop.stop(5)
    return answers, reused


def test_a_repeated_system_prompt_is_reused_and_changes_no_token(tiny_model_dir):
    """The CPU page size is small so that a common prompt prefix (the system prompt) is
    served from cached pages; the library shares whole pages only."""
    import torch
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.serving.config import ServeConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    system = list(range(5, 45))  # 40 tokens: two whole pages of 16
    prompts = [[*system, 50, 51], [*system, 60, 61, 62]]
    cpu_default = batching.cb_config_for(ServeConfig(), "cpu", 512, 0, 1)
    answers, reused = _greedy_answers(model, cpu_default, prompts)
    assert reused == [0, 32]
    one_page = ServeConfig.model_validate({"engine": {"page_size": 256}})
    unshared, reused = _greedy_answers(
        model, batching.cb_config_for(one_page, "cpu", 512, 0, 1), prompts
    )
    assert reused == [0, 0] and unshared == answers
