"""Training: one config in, one run folder out.

run.py drives a run whatever its method: it makes the run folder, starts the method's
session (sft.py with TRL's SFTTrainer, or dpo.py with its DPOTrainer), trains until done or
stopped, and writes the adapter, metrics, loss plot and cost. Both methods build their model
with model.py (the base, quantized or not, with its LoRA adapter) and share session.py
(the Trainer arguments, the last touches before the first step). callbacks.py holds the
progress bar and the stop request; launch.py starts a distributed run with `accelerate
launch`; evaluate.py scores held-out answers in process.
"""
