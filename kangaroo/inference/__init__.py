"""Using a trained model: the model folder (``export_model``, ``load_pretrained``) and
generation with a KV cache (``Generator``); ``kangaroo chat`` is built on them."""

from kangaroo.inference.folder import (GenerationDefaults, LoadedModel, Preprocessing, export_model, load_pretrained,
                                       write_model_folder)
from kangaroo.inference.generation import Frames, Generator, Prompt, Reply

__all__ = ["Frames", "GenerationDefaults", "Generator", "LoadedModel", "Preprocessing", "Prompt", "Reply",
           "export_model", "load_pretrained", "write_model_folder"]
