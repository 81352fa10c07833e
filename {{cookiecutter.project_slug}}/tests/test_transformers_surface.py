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
