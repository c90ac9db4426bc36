"""What run_magi_clm.py needs beside its overrides: the MagiAttention backend, version, model and FSDP checks.

The backend is chosen here, once: the real `magi_attention.api` when it is importable (PyPI's
`magi-attention` 0.0.1 is an empty placeholder without it), else `magi_portable`, our plain-PyTorch
implementation of the same calls. MAGI_ATTENTION_BACKEND=magi or =portable forces one.
"""

import importlib
import importlib.metadata
import os

import accelerate
import transformers
from packaging import version
from torch.distributed.device_mesh import init_device_mesh
from transformers.utils.versions import require_version

from run_guards import UserError, fsdp_version

# MagiAttention v1.1.1's chunk size, which the real API does not export; pad_size depends on it.
from magi_portable import default_chunk_size  # noqa: F401

# The two stacks the overrides are written and tested for: (transformers, accelerate, how to install it). Where
# their internals differ is below, under "Where the two supported stacks differ".
SUPPORTED_STACKS = (
    ("transformers>=4.51.0,<4.52.0", "accelerate>=1.6.0,<1.10.0", "pip install -r requirements.txt"),
    ("transformers>=5.17.0,<5.24.0", "accelerate>=1.15.0,<1.16.0", "pip install -r requirements-current.txt"),
)


def load_magi_api(choice):
    if choice not in ("auto", "magi", "portable"):
        raise UserError(f"MAGI_ATTENTION_BACKEND={choice!r}: use auto, magi or portable.")
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
    for *requirements, _ in SUPPORTED_STACKS:
        try:
            for requirement in requirements:
                require_version(requirement)
            return
        except ImportError:
            continue
    installed = " with ".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformers", "accelerate"))
    stacks = " or ".join(f"{t} with {a} ({install})" for t, a, install in SUPPORTED_STACKS)
    raise UserError(f"{installed} is not supported: the context-parallel overrides are written for {stacks}.")


# Where the two supported stacks differ: the model's mask and the names accelerate reads in a device mesh (and, for
# both scripts, FSDP's version and resume: run_guards.py).
# transformers 4.51 builds the mask in each model's `_update_causal_mask`; transformers 5 in masking_utils, which
# builds none for an attention function that is not registered with its AttentionMaskInterface (ours is not).
MODEL_BUILDS_ITS_OWN_MASK = version.parse(transformers.__version__) < version.parse("5.0.0")
# accelerate 1.6-1.9 gives the ranks of a "tp" group the same batches and shards over "dp"; accelerate 1.10+ shards
# over "dp_replicate" (and "dp_shard") and gives the ranks of a "tp" or "cp" group the same batches, so a "dp"
# dimension would silently count as one replica: every rank would get every batch. Its own ParallelismConfig with a
# CP dimension is no way out here: it refuses CP with plain (DDP) data parallelism, and its CP attention is torch's.
ACCELERATE_SHARDS_OVER_DP_REPLICATE = version.parse(accelerate.__version__) >= version.parse("1.10.0")
MESH_DIM_NAMES = ("dp_replicate", "cp") if ACCELERATE_SHARDS_OVER_DP_REPLICATE else ("dp", "tp")


def check_fsdp(training_args):
    """FSDP2 or no FSDP with CP, before any work (both scripts check the checkpoint of an FSDP run: run_guards.py)."""
    fsdp = fsdp_version(training_args)
    if fsdp not in (None, 2):
        raise UserError(
            f"FSDP{fsdp} is not supported with context parallelism (run_magi_clm.py is written and tested for FSDP2; "
            "FSDP1 is deprecated in transformers 5): give --fsdp_config '{\"fsdp_version\":2}' (with your other keys), "
            "and on transformers 4.51, which does not hand that to accelerate, set FSDP_VERSION=2 too (the launchers' "
            "FSDP=1 does both)."
        )


def cp_device_mesh(device_type, cp_size, world_size):
    """A (data-parallel, context-parallel) device mesh named so that accelerate's data loader hands the ranks of a
    CP group the same batches and different data-parallel groups different ones. Ranks r * cp_size ...
    (r + 1) * cp_size - 1 form one CP group. Returns the mesh and the CP group."""
    mesh = init_device_mesh(device_type, (world_size // cp_size, cp_size), mesh_dim_names=MESH_DIM_NAMES)
    return mesh, mesh[MESH_DIM_NAMES[1]].get_group()


def check_model_takes_magi_attention(model, attn_implementation):
    """The model must call its attention through transformers' registry and build no mask for it (transformers
    4.51: in `_update_causal_mask`, which skip_causal_mask replaces; transformers 5: through masking_utils)."""
    # Older model classes (GPT-2, OPT, ... in transformers 4.51) have neither the flag nor get_decoder: test before
    # calling it.
    takes_it = getattr(model, "_supports_attention_backend", False) and hasattr(model, "get_decoder") and (
        not MODEL_BUILDS_ITS_OWN_MASK or hasattr(model.get_decoder(), "_update_causal_mask")
    )
    if not takes_it:
        raise UserError(
            f"{type(model).__name__} cannot take the registered attention function '{attn_implementation}': "
            "it does not call attention through transformers' ALL_ATTENTION_FUNCTIONS. Use a model that does "
            "(Llama, Mistral, Qwen2, ...) or run run_origin_clm.py."
        )
    num_heads, num_kv_heads = attention_heads(model.config)
    if num_heads % num_kv_heads != 0:
        raise UserError(
            f"num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads}), so "
            "grouped-query attention cannot split the heads: fix the model config (--config_overrides)."
        )


def attention_heads(config):
    """Query and key/value heads; a config without num_key_value_heads (GPT-2, ...) has one key/value head a query
    head."""
    return config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def skip_causal_mask(model):
    """transformers 4.51 builds a [batch, 1, seq, seq] mask for attention implementations it does not know; the
    MagiAttention key carries the mask, so the model builds none. transformers 5 builds none by itself."""
    if MODEL_BUILDS_ITS_OWN_MASK:
        model.get_decoder()._update_causal_mask = lambda *args, **kwargs: None
