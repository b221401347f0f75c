"""Low-rank adapters extracted from a fine-tune: ``finetuned - base`` as a PEFT LoRA.

:func:`extract_lora` reads two checkpoints tensor by tensor, takes the task
vector ``delta = W_finetuned - W_base`` of every 2-D linear weight, keeps its
leading singular directions (a fixed rank, or the smallest rank reaching an
energy threshold), stores what cannot be factored (embeddings, norms, a grown
vocabulary) whole as PEFT ``modules_to_save``, and writes a PEFT LoRA adapter
folder that
``peft.PeftModel.from_pretrained(base_model, OUT)`` loads.
"""

from __future__ import annotations

from modelfuse.lora.adapter import LoraResult, ModuleFit
from modelfuse.lora.extract import EmbeddingMode, extract_lora, matching_tensors
from modelfuse.lora.factors import low_rank_factors

__all__ = [
    "EmbeddingMode",
    "LoraResult",
    "ModuleFit",
    "extract_lora",
    "low_rank_factors",
    "matching_tensors",
]
