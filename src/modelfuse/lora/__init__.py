"""Low-rank adapters extracted from a fine-tune: ``finetuned - base`` as a PEFT LoRA.

:func:`extract_lora` reads two checkpoints tensor by tensor, takes the task
vector ``delta = W_finetuned - W_base`` of every 2-D linear weight, keeps its
leading singular directions (a fixed rank, or the smallest rank reaching an
energy threshold) and writes a PEFT LoRA adapter folder that
``peft.PeftModel.from_pretrained(base_model, OUT)`` loads.
"""

from __future__ import annotations

from modelfuse.lora.extract import (
    LoraResult,
    ModuleFit,
    extract_lora,
    low_rank_factors,
    matching_tensors,
)

__all__ = ["LoraResult", "ModuleFit", "extract_lora", "low_rank_factors", "matching_tensors"]
