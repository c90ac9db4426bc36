"""What run_magi_clm.py needs beside its overrides: the MagiAttention backend, version and model checks.

The backend is chosen here, once: the real `magi_attention.api` when it is importable (PyPI's
`magi-attention` 0.0.1 is an empty placeholder without it), else `magi_portable`, our plain-PyTorch
implementation of the same calls. MAGI_ATTENTION_BACKEND=magi or =portable forces one.
"""

import importlib
import os

import accelerate
import transformers
from packaging import version

# MagiAttention v1.1.1's chunk size, which the real API does not export; pad_size depends on it.
from magi_portable import default_chunk_size  # noqa: F401

# The Trainer and Accelerator overrides reach into these versions' internals.
SUPPORTED_TRANSFORMERS = ("4.51.0", "4.52.0")  # [low, high)
SUPPORTED_ACCELERATE = ("1.6.0", "1.10.0")  # accelerate 1.10 reads device-mesh dimension names differently


def load_magi_api(choice):
    if choice not in ("auto", "magi", "portable"):
        raise ValueError(f"MAGI_ATTENTION_BACKEND={choice!r}: use auto, magi or portable.")
    if choice != "portable":
        try:
            return importlib.import_module("magi_attention.api")
        except ImportError as error:
            if choice == "magi":
                raise ImportError(
                    "MAGI_ATTENTION_BACKEND=magi but magi_attention.api is not importable (PyPI's magi-attention "
                    "0.0.1 is an empty placeholder). Build MagiAttention from source on a Hopper GPU "
                    "(git clone --recursive https://github.com/SandAI-org/MagiAttention && "
                    "pip install --no-build-isolation .), or unset MAGI_ATTENTION_BACKEND to use magi_portable."
                ) from error
    return importlib.import_module("magi_portable")


magi_api = load_magi_api(os.environ.get("MAGI_ATTENTION_BACKEND", "auto"))


def check_supported_versions():
    for package, (low, high) in ((transformers, SUPPORTED_TRANSFORMERS), (accelerate, SUPPORTED_ACCELERATE)):
        if not version.parse(low) <= version.parse(package.__version__) < version.parse(high):
            raise RuntimeError(
                f"{package.__name__} {package.__version__} is not supported: the context-parallel overrides are "
                f"written for {package.__name__}>={low},<{high}. Install the pinned versions: "
                "pip install -r requirements.txt"
            )


def check_model_takes_magi_attention(model, attn_implementation):
    """The model must call its attention through transformers' registry, and build its mask in
    `_update_causal_mask`, which we skip (see skip_causal_mask)."""
    # Older model classes (GPT-2, OPT, ...) have neither the flag nor get_decoder: test before calling it.
    takes_it = getattr(model, "_supports_attention_backend", False) and hasattr(model, "get_decoder") \
        and hasattr(model.get_decoder(), "_update_causal_mask")
    if not takes_it:
        raise ValueError(
            f"{type(model).__name__} cannot take the registered attention function '{attn_implementation}': "
            "it does not call attention through transformers' ALL_ATTENTION_FUNCTIONS. Use a model that does "
            "(Llama, Mistral, Qwen2, ...) or run run_origin_clm.py."
        )
    if model.config.num_attention_heads % model.config.num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads ({model.config.num_attention_heads}) is not a multiple of num_key_value_heads "
            f"({model.config.num_key_value_heads}): grouped-query attention cannot split the heads. "
            "Fix the model config (--config_overrides)."
        )


def skip_causal_mask(model):
    """transformers 4.51 builds a [batch, 1, seq, seq] mask for attention implementations it does not know.
    The MagiAttention key carries the mask, so the model builds none."""
    model.get_decoder()._update_causal_mask = lambda *args, **kwargs: None
