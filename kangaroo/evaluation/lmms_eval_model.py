"""The ``kangaroo`` model of lmms-eval: ``lmms-eval --model kangaroo --model_args pretrained=DIR``.

Installing the project registers it through lmms-eval's ``lmms_eval.models`` entry point
(``manifest`` below, named in pyproject.toml). It is a "simple" lmms-eval model: each request
brings its prompt text, its generation settings and a ``doc_to_visual`` that gives the video's
path; the video then goes through the model folder's own decode and frame sampling, the prompt
through its chat template, and the reply through ``Generator.generate`` (greedy when the task
says ``temperature: 0``), cut at the task's ``until`` strings. ``loglikelihood`` scores a
continuation after the prompt in one forward pass.

lmms-eval is not a dependency: the class derives from lmms-eval's ``lmms`` where it is
installed, and from ``object`` elsewhere, so that it works (and is tested) through this same
Python interface either way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

from kangaroo.inference import Generator, load_pretrained
from kangaroo.inference.generation import cut_at_stops

try:  # lmms-eval's base class where lmms-eval is installed
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object


def manifest():
    """The entry point's payload: lmms-eval's registry record of this model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="kangaroo", simple_class_path="kangaroo.evaluation.lmms_eval_model.Kangaroo")


class Kangaroo(_Base):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, frames: int | None = None,
                 batch_size: int | str = 1, **kwargs: Any) -> None:
        if _Base is not object:
            super().__init__()
        self.generator = Generator(load_pretrained(pretrained, device=device, dtype=dtype))
        if frames is not None:
            from kangaroo.evaluation.run import frame_sampling

            self.generator.sampling = frame_sampling(self.generator.sampling, int(frames), None)
        self.task_dict: dict = getattr(self, "task_dict", {})
        self._scratch = tempfile.mkdtemp(prefix="kangaroo-lmms-")  # images handed over as PIL images
        weakref.finalize(self, shutil.rmtree, self._scratch, True)

    # -- requests ---------------------------------------------------------------------------

    def _media(self, doc_to_visual, doc_id: int, task: str, split: str) -> str | None:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} visuals; a conversation holds one video or image")
        if not visuals:
            return None
        visual = visuals[0]
        if isinstance(visual, str):
            return visual
        if hasattr(visual, "save"):  # a PIL image, as image tasks give
            path = os.path.join(self._scratch, f"{task}-{split}-{doc_id}.png")
            visual.convert("RGB").save(path)
            return path
        raise TypeError(f"{task} doc {doc_id}: unsupported visual {type(visual).__name__}")

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        replies = []
        for request in tqdm(requests, desc="kangaroo generate_until", disable=len(requests) < 2):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.generator.prompt([{"role": "user", "content": context}],
                                           self._media(doc_to_visual, doc_id, task, split))
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            reply = self.generator.generate(
                [prompt], max_new_tokens=int(gen_kwargs.get("max_new_tokens", 16)), temperature=temperature,
                do_sample=bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0,
                top_p=gen_kwargs.get("top_p") if temperature > 0 else None)[0].text
            replies.append(cut_at_stops(reply, until))
        return replies

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt), whether greedy decoding gives exactly it)``."""
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            prompt = self.generator.prompt([{"role": "user", "content": context}],
                                           self._media(doc_to_visual, doc_id, task, split))
            target = self.generator.tokenizer.encode(str(continuation), add_special_tokens=False)
            logprobs = self.generator.continuation_logprobs(prompt, target)
            chosen = logprobs[range(len(target)), target]
            results.append((float(chosen.sum()), logprobs.argmax(-1).tolist() == target))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("kangaroo answers multi-round tasks through generate_until's prompt")
