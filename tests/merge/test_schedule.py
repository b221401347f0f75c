"""The engine's schedule: how much memory a piece is counted for."""

import torch
import yaml
from safetensors.torch import save_file

from modelfuse.merge.engine import close_plan, plan_merge
from modelfuse.merge.schedule import working_bytes


def test_a_reduction_counts_its_inputs_and_a_merge_also_its_result_and_output(tmp_path):
    for i in range(3):
        tensors = {"w": torch.zeros(40, 50, dtype=torch.bfloat16)}
        save_file(tensors, str(tmp_path / f"m{i}.safetensors"))
    config = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "m0.safetensors"),
        "models": [str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors")],
        "parameters": {"density": 0.5},
    }
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = plan_merge(path)
    try:
        task = next(t for t in plan.tasks if t.name == "w")
        inputs = 3 * 2000 * 2  # three bfloat16 inputs of 2000 entries
        assert working_bytes(plan, task, None, "reduce") == inputs
        assert working_bytes(plan, task, None) == inputs + 2000 * (4 + 2)  # float32 + bfloat16
        assert working_bytes(plan, task, (0, 10), "reduce") == inputs // 4
    finally:
        close_plan(plan)
