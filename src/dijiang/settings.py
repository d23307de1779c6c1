"""Every environment variable dijiang reads, in one place, each read when it is used (not at import), so a
variable set after ``import dijiang`` (by a test, a notebook, a launcher) takes effect on the next call.

| variable | default | what it does |
| --- | --- | --- |
| ``DIJIANG_CACHE`` | ``~/.cache/dijiang`` | folder of the dequantised GGUF models and the packed training blocks |
| ``DIJIANG_TRITON_DIRECT_LAUNCH`` | ``1`` | ``0``: every Triton launch goes through Triton's own dispatch instead of calling the compiled kernel directly |
| ``DIJIANG_INLINE_CARRY`` | unset | ``1`` / ``0``: force the fused kernel's in-kernel segment carry on (where allowed) / off; unset: chosen by size |
| ``DIJIANG_COMPILE_MODE`` | ``max-autotune-no-cudagraphs`` | ``torch.compile`` mode of the fast decoder's step (empty: torch's default) |
| ``DIJIANG_COMPILE_SCOPE`` | ``layer`` | ``layer``: compile one decode-layer step per layer kind; ``step``: compile the whole step |
| ``DIJIANG_WINDOW_DECODE_KERNEL`` | ``1`` | window layers' decode in one Triton kernel on CUDA; ``0``: the compiled torch step; ``force``: the kernel on any device |
| ``ACCELERATE_USE_FSDP`` | ``false`` | set by ``accelerate launch`` with an FSDP config: training shards the model |

``TRITON_INTERPRET=1`` (Triton's own) runs the kernels under Triton's interpreter on the CPU. Triton reads it
when it defines the kernels, i.e. when ``dijiang.ops.triton_dijiang`` is first imported, so it must be set
before that; dijiang asks the kernels which kind they became (``triton_dijiang.INTERPRETED``).
"""
from __future__ import annotations

import os
from pathlib import Path

COMPILE_SCOPES = ("layer", "step")
_SWITCH = {"0": False, "1": True}


# posix keeps os.environ's entries as bytes in os.environ._data (Windows upper-cases str keys: no shortcut there)
_BYTES_ENVIRON = os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict)


def _raw(name: str) -> str | None:
    """``os.environ.get(name)``. The Triton switches are read on every kernel launch, where host time is what a
    short call costs; ``os.environ.get`` of an unset name takes ~3 us (two exceptions), the dict behind it ~0.1 us."""
    if not _BYTES_ENVIRON:
        return os.environ.get(name)
    value = os.environ._data.get(name.encode())
    return None if value is None else os.fsdecode(value)


def cache_dir() -> Path:
    """$DIJIANG_CACHE, else ~/.cache/dijiang."""
    value = _raw("DIJIANG_CACHE")
    return Path.home() / ".cache" / "dijiang" if value is None else Path(value)


def triton_direct_launch() -> bool:
    """False when DIJIANG_TRITON_DIRECT_LAUNCH=0."""
    return _raw("DIJIANG_TRITON_DIRECT_LAUNCH") != "0"


def inline_carry() -> bool | None:
    """DIJIANG_INLINE_CARRY: True ("1"), False ("0"), or None (unset or anything else: chosen by size)."""
    return _SWITCH.get(_raw("DIJIANG_INLINE_CARRY"))


def compile_mode() -> str | None:
    """DIJIANG_COMPILE_MODE; empty means None (torch.compile's default mode)."""
    value = _raw("DIJIANG_COMPILE_MODE")
    return "max-autotune-no-cudagraphs" if value is None else (value or None)


def compile_scope() -> str:
    """DIJIANG_COMPILE_SCOPE, "layer" or "step"; ValueError for anything else."""
    value = _raw("DIJIANG_COMPILE_SCOPE")
    value = "layer" if value is None else value
    if value not in COMPILE_SCOPES:
        raise ValueError(f"DIJIANG_COMPILE_SCOPE must be 'layer' or 'step', got {value!r}")
    return value


def window_decode_kernel() -> str:
    """DIJIANG_WINDOW_DECODE_KERNEL as given ("1" when unset): "0" off, "force" on any device, else on for CUDA."""
    value = _raw("DIJIANG_WINDOW_DECODE_KERNEL")
    return "1" if value is None else value


def accelerate_use_fsdp() -> bool:
    """ACCELERATE_USE_FSDP=true (any case)."""
    return (_raw("ACCELERATE_USE_FSDP") or "false").lower() == "true"
