"""LoRA Studio: train, merge and generate with LoRAs for Stable Diffusion 1.5 and SDXL."""

import logging

# transformers notes on every run that torchvision is missing and that it falls back to the PIL CLIP image
# processor; the studio never uses image processors (no safety checker), so the notice is only noise.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
