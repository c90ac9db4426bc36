"""RECIPE=full of the launchers needs GPUs, the Hub and access to the gated Llama-3.2-1B: checked at once, rather
than after the data loader's retries. Exits with the reason when one is missing."""

import sys

import torch
from huggingface_hub import auth_check
from huggingface_hub.errors import HfHubHTTPError

if not torch.cuda.is_available():
    sys.exit("RECIPE=full needs GPUs and this machine has none (torch sees no CUDA device): use RECIPE=default here")
try:
    auth_check("meta-llama/Llama-3.2-1B")
except HfHubHTTPError:
    sys.exit("RECIPE=full needs access to the gated meta-llama/Llama-3.2-1B: accept its license on huggingface.co, "
             "then log in with huggingface-cli login (or set HF_TOKEN)")
except Exception as error:
    sys.exit(f"RECIPE=full needs the Hugging Face Hub, which this machine cannot reach ({type(error).__name__}): "
             "use RECIPE=default here")
