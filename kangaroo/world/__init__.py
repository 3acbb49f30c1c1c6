"""The tiny world: the embedded default's synthetic data and the stand-ins for its pre-trained
models, built from the layers below (model parts, data) so that the tiny recipe runs the same
code as the 8B one. ``render`` draws the scenes and writes their manifests, ``tokenizer`` trains
the tiny BPE, ``pretrain`` trains the tiny LLM and ViT, ``build.synthesize`` writes it all, and
``demo_clips`` renders the short clips that show the curation filters at work."""

from kangaroo.world.build import synthesize
from kangaroo.world.render import WorldConfig

__all__ = ["WorldConfig", "synthesize"]
