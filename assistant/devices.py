"""Device, dtype and attention choices shared by the torch backends (torch is imported only inside)."""

from __future__ import annotations

from typing import Any

from assistant.errors import ConfigError


def pick_device(device: str, section: str) -> str:
    """``auto`` -> cuda when present, else cpu; an explicit CUDA device is refused where there is none."""
    import torch

    cuda_available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise ConfigError(f"{section}.device {device!r}: CUDA is not available here; use 'auto' or 'cpu'")
    return device


def pick_dtype(dtype: str, device: str, section: str) -> Any:
    """``auto`` -> float16 on CUDA, float32 on CPU (CPU half-precision matmuls are slow or missing)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ConfigError(f"{section}.dtype {dtype!r} is not available here; choose auto, {', '.join(choices)}")
    return choices[dtype]


def pick_attention(attention: str, device: str) -> str:
    """``auto`` -> Flash-Attention 2 on CUDA when installed, else PyTorch SDPA."""
    if attention != "auto":
        return attention
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def quiet_model_libraries() -> None:
    """Keep transformers' progress bars and notices, and what libraries it imports print on import, out of our
    output; their errors still show. Call before importing transformers models: transformers imports torchao when
    it is installed, and torchao logs each CUDA-only extension a CPU build of torch cannot load."""
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress bar reports; theirs would interleave
    transformers_logging.set_verbosity_error()  # generate() warns about options its own Whisper code passes
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
