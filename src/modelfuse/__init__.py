"""modelfuse: fuse trained neural networks.

Merge checkpoints in weight space (:mod:`modelfuse.merge`), ensemble
predictions (:mod:`modelfuse.ensemble`), calibrate (:mod:`modelfuse.calibration`)
and compare candidates honestly (:mod:`modelfuse.evaluation`).

Examples
--------
>>> import torch, modelfuse
>>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
>>> modelfuse.merge_state_dicts("linear", [a, b])["w"]
tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "inspect_merge", "merge", "merge_state_dicts"]

if TYPE_CHECKING:
    from modelfuse import merge
    from modelfuse.inspection import inspect_merge
    from modelfuse.merge.state_dict import merge_state_dicts


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import modelfuse` (and the CLI's --help)
    # does not pay for importing torch.
    if name == "merge":  # the package, callable as modelfuse.merge(config, out)
        import modelfuse.merge

        return modelfuse.merge
    if name == "inspect_merge":  # not `inspect`, which would shadow the standard library's
        from modelfuse.inspection import inspect_merge

        return inspect_merge
    if name == "merge_state_dicts":
        from modelfuse.merge.state_dict import merge_state_dicts

        return merge_state_dicts
    raise AttributeError(f"module 'modelfuse' has no attribute {name!r}")
