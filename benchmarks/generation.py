"""Generation speed of a model folder: the prompt's prefill, then new tokens per second with the
language model's KV cache against recomputing the whole sequence at every step.

    python benchmarks/generation.py [--frames 16] [--new-tokens 256] [--model DIR]
    python benchmarks/generation.py --image-size 224 --width 512 --layers 8   # a larger stand-in

Without ``--model`` it writes a folder of the tiny model (random weights: the speed does not
depend on them; ``--image-size``, ``--width``, ``--layers`` size it) and a 16-frame clip. Greedy decoding; every new token is forced (EOS cannot
end it early) so both paths decode the same count. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_folder(root: str, image_size: int, width: int, layers: int, corpus: list[str] | None = None) -> str:
    from kangaroo.data.video import FrameSampling
    from kangaroo.inference import Preprocessing, write_model_folder
    from kangaroo.modules import build_kangaroo, kangaroo_tiny_config
    from kangaroo.world.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    config = kangaroo_tiny_config(image_size=image_size)
    config.vision_tower.timm_kwargs = {"depth": 4, "global_pool": "token"}  # the tiny recipe's tower
    config.language_model.transformers_config.update(hidden_size=width, intermediate_size=3 * width,
                                                     num_hidden_layers=layers, num_attention_heads=max(4, width // 64),
                                                     num_key_value_heads=max(2, width // 256))
    model = build_kangaroo(config)
    tokenizer = build_tiny_tokenizer(corpus or ["What happens in this video? A red circle moves left."] * 20)
    folder = os.path.join(root, "model")
    write_model_folder(folder, config, model.state_dict(), tokenizer,
                       Preprocessing(image_size=image_size, sampling=FrameSampling("uniform", num_frames=16, multiple_of=2),
                                     max_tokens=4096))
    return folder


def main() -> None:
    from kangaroo.data.video import write_video
    from kangaroo.inference import Generator, load_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: the tiny model, random weights)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=112, help="of the generated model (default: the tiny one's)")
    parser.add_argument("--width", type=int, default=128, help="LLM hidden size of the generated model (tiny: 128)")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers of the generated model (tiny: 4)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as root:
        folder = args.model or tiny_folder(root, args.image_size, args.width, args.layers)
        generator = Generator(load_pretrained(folder))
        clip = os.path.join(root, "clip.mp4")
        rng = np.random.default_rng(0)
        write_video(clip, (rng.random((args.frames * 2, 96, 128, 3)) * 255).astype(np.uint8), fps=4)
        from kangaroo.data.video import FrameSampling

        generator.encoder.prepare.sampling = FrameSampling("uniform", num_frames=args.frames, multiple_of=2)
        prompt = generator.prompt([{"role": "user", "content": "What happens in this video?"}], clip)
        llm = generator.model.language_model
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=generator.stop_ids, pad_token_id=generator.pad_id)
        with torch.no_grad():
            generator.embed([prompt])  # warm-up
            started = time.perf_counter()
            embeds, mask = generator.embed([prompt])
            vision = time.perf_counter() - started
            started = time.perf_counter()
            llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            prefill = time.perf_counter() - started

            started = time.perf_counter()
            cached = llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)[0].tolist()
            with_cache = time.perf_counter() - started

            started = time.perf_counter()
            tokens: list[int] = []
            table = llm.get_input_embeddings()
            for _ in range(args.new_tokens):
                new = table(torch.tensor([tokens], dtype=torch.long))
                logits = llm(inputs_embeds=torch.cat([embeds, new], dim=1), use_cache=False).logits[0, -1]
                logits[generator.stop_ids] = float("-inf")  # as min_new_tokens does
                tokens.append(int(logits.argmax()))
            without_cache = time.perf_counter() - started
    same = cached == tokens
    print(f"prompt: {len(prompt.input_ids)} tokens ({prompt.frames} frames); threads {torch.get_num_threads()}")
    print(f"visual features (vision tower, patchify, projector): {vision:.3f} s")
    print(f"prefill (language model over the prompt): {prefill:.3f} s")
    print(f"with KV cache: {args.new_tokens / with_cache:.1f} tokens/s ({with_cache:.2f} s for {args.new_tokens})")
    print(f"recomputing the sequence: {args.new_tokens / without_cache:.1f} tokens/s ({without_cache:.2f} s)")
    print(f"speed-up: x{without_cache / with_cache:.1f}; same tokens: {same}")


if __name__ == "__main__":
    main()
