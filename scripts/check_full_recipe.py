"""RECIPE=full of the launchers needs GPUs, the Hub and access to its model (MODEL, gated for Meta's Llamas): checked
at once, rather than after the data loader's retries. Exits with the reason when one is missing.

    python scripts/check_full_recipe.py meta-llama/Llama-3.1-8B
"""

import sys

import torch
from huggingface_hub import auth_check
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

model = sys.argv[1]
if not torch.cuda.is_available():
    sys.exit("RECIPE=full needs GPUs and this machine has none (torch sees no CUDA device): use RECIPE=default here")
try:
    auth_check(model)
except GatedRepoError:
    sys.exit(f"RECIPE=full needs access to the gated {model}: accept its license on huggingface.co, then log in with "
             "huggingface-cli login (or set HF_TOKEN)")
except RepositoryNotFoundError:
    sys.exit(f"MODEL={model} is no model on the Hugging Face Hub that this login can see: check the name (or log in "
             "with huggingface-cli login)")
except Exception as error:
    sys.exit(f"RECIPE=full needs the Hugging Face Hub, which this machine cannot reach ({type(error).__name__}): "
             "use RECIPE=default here")
