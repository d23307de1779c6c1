"""Recording a teacher's attention inputs and outputs, so that a student's attention module can be run on exactly
the teacher's inputs (attention transfer in `train`, per-layer fidelity in `evaluate`)."""
from __future__ import annotations

import contextlib
from typing import Iterable

from torch import nn


def first_tensor(output):
    """An attention module's output tensor (modules return (output, weights, ...) tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def module_io(model: nn.Module, paths: Iterable[str]):
    """While the block runs, record each named module's last call: {path: {"args", "kwargs", "output"}}.

    The hooks are removed on exit, also when the forward pass raises."""
    records: dict[str, dict] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def keep_inputs(_module, args, kwargs, path=path):
            records[path] = {"args": args, "kwargs": dict(kwargs)}

        def keep_output(_module, _args, output, path=path):
            records[path]["output"] = first_tensor(output)

        handles += [module.register_forward_pre_hook(keep_inputs, with_kwargs=True),
                    module.register_forward_hook(keep_output)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
