"""The model folder: everything a trained model needs to answer a question, in one place.

Layout of a folder written by ``export_model`` (``kangaroo export``, or the last stage of a
recipe)::

    config.json              {"format": 1, "architecture": {...}}: the KangarooConfig, with the
                             language model's transformers config inline (no hub id, no remote code)
    model.safetensors        the weights (the stage's own key names)
    adapters.safetensors, adapters.json   only with ``--keep-adapters``: LoRA adapters kept apart
                             from the base weights in model.safetensors
    preprocessor_config.json resolution, resize mode, frame sampling, image time, sample budget
    generation_config.json   sampling defaults and the stop tokens
    tokenizer.json, tokenizer_config.json, ...   the tokenizer with its chat template

``load_pretrained(DIR)`` reads it back: weights only through safetensors, never remote code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from kangaroo import storage
from kangaroo.data.encode import PrepareConfig
from kangaroo.data.video import FrameSampling
from kangaroo.modules.adapters import load_adapters, read_adapters
from kangaroo.modules.builder import KangarooConfig, build_kangaroo
from kangaroo.modules.language_model import resolve_attention, resolve_llm_config
from kangaroo.modules.precision import cast_model
from kangaroo.training.weights import WEIGHTS_NAME, load_weights, read_state_dict, save_state_dict

log = logging.getLogger(__name__)

FORMAT = 1
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
GENERATION_NAME = "generation_config.json"
STAGE_CONFIG_NAMES = ("stage.yaml",)
"""The stage file a recipe writes into each stage folder (``kangaroo.recipe.runner``)."""


@dataclass
class Preprocessing:
    """What turns a video or image into model input, as ``prepare`` did for the last stage."""

    image_size: int
    resize: str = "pad"
    sampling: FrameSampling = field(default_factory=FrameSampling)
    image_max_time: float = 60.0
    max_tokens: int = 2560
    """The longest prompt, in tokens: frames are dropped evenly beyond it, as in ``prepare``."""

    def prepare_config(self, tokenizer: str) -> PrepareConfig:
        return PrepareConfig(tokenizer=tokenizer, sampling=self.sampling, resize=self.resize,  # type: ignore[arg-type]
                             max_tokens=self.max_tokens, image_max_time=self.image_max_time, shuffle=False)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "Preprocessing":
        fields = dict(fields)
        fields["sampling"] = FrameSampling(**fields.get("sampling", {}))
        return cls(**fields)


@dataclass
class GenerationDefaults:
    """Decoding defaults (those of the released chat model: temperature 0.6, top-p 0.9)."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    stop_tokens: list[str] = field(default_factory=lambda: ["<|eot_id|>"])
    """Generation ends at any of these or at the tokenizer's EOS token."""

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "GenerationDefaults":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{GENERATION_NAME}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**fields)


def architecture_to_dict(config: KangarooConfig) -> dict[str, Any]:
    """``config`` as JSON-ready data that stands alone: the language model's full transformers
    config inline (overrides applied, no hub id), no pretrained sources (the weights file holds
    every weight), no remote code."""
    llm = resolve_llm_config(config.language_model, config.language_model_overrides).to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "auto_map", "torch_dtype", "dtype",
                "_attn_implementation_autoset"):
        llm.pop(key, None)
    data = asdict(config)
    data["language_model"].update(transformers_config=llm, pretrained=None, trust_remote_code=False, torch_dtype=None,
                                  extra={})
    data["language_model_overrides"] = None
    data["vision_tower"]["pretrained"] = None
    return json.loads(json.dumps(data))  # tuples as lists


def architecture_from_dict(data: dict[str, Any], where: str = CONFIG_NAME) -> KangarooConfig:
    """The inverse of ``architecture_to_dict``, through jsonargparse, which checks every field."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--architecture", type=KangarooConfig, required=True)
    try:
        return parser.instantiate(parser.parse_object({"architecture": data})).architecture
    except Exception as err:  # jsonargparse and the dataclasses' own checks raise various types
        raise ValueError(f"{where}: not a valid model architecture: {err}") from err


def export_model(source: str, output: str, config: str | None = None, overwrite: bool = False,
                 keep_adapters: bool = False) -> str:
    """Writes the model folder of ``source`` into ``output`` and returns ``output``.

    ``source``: a stage folder (its ``model.safetensors``), a checkpoint file, or a sharded
    checkpoint folder. ``config``: the stage file that trained it; by default the ``stage.yaml``
    a recipe keeps in the stage folder (for a checkpoint, in the folder above ``checkpoints/``).
    The stage file gives the architecture and, from its ``data.prepare``, the tokenizer and the
    preprocessing. A stage that trained adapters is exported with them merged into the weights,
    or, with ``keep_adapters``, with its base weights and its adapters apart (``load_pretrained``
    reads both)."""
    from transformers import AutoTokenizer

    from kangaroo.training.stage_file import load_stage_file

    stage_file = config or _find_stage_file(source)
    sections = load_stage_file(stage_file)
    stage, data = sections["model"], sections["data"]
    if data.prepare is None:
        raise ValueError(f"{stage_file}: no data.prepare section; the model folder takes its tokenizer and "
                         "preprocessing from it")
    weights = _weights_of(source)
    adapters = None
    if stage.adapters:
        weights_state, adapters = _adapted_weights(stage, source, weights, keep_adapters)
    elif keep_adapters:
        raise ValueError(f"{stage_file}: the stage trained no adapters; there are none to keep apart")
    else:
        weights_state = read_state_dict(weights)
    prepare = data.prepare
    # the minimum duration filters training data (instruction data drops clips under 5 s), not questions
    preprocessing = Preprocessing(image_size=stage.architecture.vision_tower.image_size, resize=prepare.resize,
                                  sampling=replace(prepare.sampling, min_duration=0.0),
                                  image_max_time=prepare.image_max_time,
                                  max_tokens=prepare.max_tokens)
    write_model_folder(output, stage.architecture, weights_state, AutoTokenizer.from_pretrained(prepare.tokenizer),
                       preprocessing, overwrite=overwrite, adapters=adapters,
                       source={"weights": weights, "stage_file": os.path.abspath(stage_file)})
    log.info("model folder written to %s", output)
    return output


def _adapted_weights(stage, source: str, weights: str, keep: bool):
    """The weights of a stage that trained adapters, merged (``keep`` false) or as base weights
    and adapters apart. From a stage folder (or its ``model.safetensors``): its merged weights as
    they are, or with the adapters beside them taken out (the base is the merged weights less the
    adapters' update, exact to float rounding). From a
    checkpoint, which holds only what trained: the model rebuilt as the stage built it (from its
    ``init_from`` or pretrained sources) and the checkpoint's tensors loaded into it."""
    from kangaroo.modules.adapters import (adapter_state_dict, base_state_dict, load_adapters, merged_state_dict,
                                           read_adapters, unmerge)

    if weights.endswith(WEIGHTS_NAME):  # a stage's weights (its folder or the file): merged already
        if not keep:
            return read_state_dict(weights), None
        if storage.is_remote(weights):
            raise ValueError(f"--keep-adapters reads a local stage folder; download {weights} and the adapters "
                             "beside it first")
        folder = os.path.dirname(weights)
        kept = read_adapters(folder)
        if kept is None:
            raise ValueError(f"{folder}: the stage trained adapters but the folder has no adapters.json beside its "
                             "weights (written at the end of a fit since adapters can be kept apart); export it "
                             "merged, or export one of its checkpoints with --keep-adapters")
        model = build_kangaroo(stage.architecture, load_weights=False)
        load_weights(model, weights)
        load_adapters(model, *kept, where=folder)
        unmerge(model)
    else:
        architecture = stage.architecture
        sources = architecture.language_model.pretrained or architecture.vision_tower.pretrained
        if stage.init_from is None and not (stage.load_pretrained and sources):
            raise ValueError(f"{source} holds only what the stage trained, and the stage has neither init_from nor "
                             "pretrained sources to rebuild its frozen weights from; export the stage folder")
        stage.configure_model()  # init_from or the pretrained sources, then the adapters, as in the fit
        model = stage.model
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = read_state_dict(weights)
        missing = sorted(trained - set(state))
        if missing:
            raise ValueError(f"{source} does not hold what the stage trains: missing {missing[:5]} ({len(missing)})")
        model.load_state_dict(state, strict=False)
    if not keep:
        return merged_state_dict(model.state_dict(), stage.adapters), None
    return base_state_dict(model), (stage.adapters, adapter_state_dict(model))


def write_model_folder(output: str, architecture: KangarooConfig, state: dict[str, torch.Tensor], tokenizer,
                       preprocessing: Preprocessing, generation: GenerationDefaults | None = None,
                       overwrite: bool = False, source: dict[str, Any] | None = None, adapters=None) -> str:
    """Writes a model folder from its parts: ``state`` holds the model's weights by their own
    key names (a stage's ``model.safetensors``); each must fit ``architecture``. ``adapters``:
    (part -> ``AdapterConfig``, their tensors) kept apart from ``state``, the base weights."""
    if storage.is_remote(output):
        raise ValueError(f"a model folder is written to a local path, not {output}")
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; a model folder needs one")
    model_keys = _check_weights(architecture, state, (source or {}).get("weights", "the given state"))
    if generation is None:
        stops = [t for t in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>") if t in tokenizer.get_vocab()]
        generation = GenerationDefaults(stop_tokens=stops)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    # written beside the target and renamed into place: a cut-off export never looks finished
    local = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        tokenizer.save_pretrained(local)
        save_state_dict({k: state[k] for k in model_keys}, os.path.join(local, WEIGHTS_NAME))
        if adapters is not None:
            from kangaroo.training.weights import write_adapters

            write_adapters(local, *adapters)
        _write_json(os.path.join(local, CONFIG_NAME),
                    {"format": FORMAT, "architecture": architecture_to_dict(architecture), "source": source or {}})
        _write_json(os.path.join(local, PREPROCESSOR_NAME), asdict(preprocessing))
        _write_json(os.path.join(local, GENERATION_NAME), asdict(generation))
        os.chmod(local, 0o755)  # mkdtemp's folder is private; a model folder is not
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(local, output)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return output


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, ensure_ascii=False)


def _find_stage_file(source: str) -> str:
    source = source.rstrip("/")
    folders = [source] if os.path.isdir(source) and not source.endswith(".ckpt") else []
    parent = os.path.dirname(source)
    folders += [parent, os.path.dirname(parent)] if os.path.basename(parent) == "checkpoints" else [parent]
    for folder in folders:
        for name in STAGE_CONFIG_NAMES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise ValueError(f"no stage file found for {source} (looked for {list(STAGE_CONFIG_NAMES)} in {folders}); "
                     "name the stage file that trained it with --stage")


def _weights_of(source: str) -> str:
    if not storage.exists(source):
        raise FileNotFoundError(f"no such stage folder or checkpoint: {source}")
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, WEIGHTS_NAME)):
        return os.path.join(source, WEIGHTS_NAME)
    return source  # a checkpoint file or a sharded checkpoint folder: read_state_dict knows both


def _check_weights(architecture: KangarooConfig, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """The keys of ``state`` the model has; a missing or mis-shaped one is an error naming it."""
    with torch.device("meta"):
        model = build_kangaroo(architecture)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    shapes = sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
                    for k, v in own.items() if k in state and state[k].shape != v.shape)
    if missing or shapes:
        raise ValueError(f"weights {source} do not match the stage's architecture: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}; shape mismatch {shapes[:8]}")
    return list(own)


@dataclass
class LoadedModel:
    """What ``load_pretrained`` returns: the model in eval mode and how to talk to it."""

    model: Any
    tokenizer: Any
    preprocessing: Preprocessing
    generation: GenerationDefaults
    folder: str
    attention: str = "sdpa"
    """The attention kernel this load runs (the folder's choice resolved for its device and dtype)."""

    def describe(self) -> str:
        """One line for the log: the folder, the device, the dtype and the attention kernel."""
        parameter = next(self.model.parameters())
        return (f"model folder {self.folder}: {parameter.device}, {str(parameter.dtype).removeprefix('torch.')}, "
                f"attention {self.attention}")


def load_pretrained(folder: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> LoadedModel:
    """Loads a model folder (see the module docstring) on ``device``; ``dtype`` casts the weights
    (e.g. ``bfloat16`` on a GPU) as training did: the RoPE tables stay fp32
    (``kangaroo.modules.precision``). The attention kernel is the folder's choice resolved for this
    device and dtype (``resolve_attention``), logged. Any missing, unreadable or mismatched file is an error naming it."""
    from transformers import AutoTokenizer

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no model folder at {folder}")
    paths = {name: os.path.join(folder, name) for name in (CONFIG_NAME, PREPROCESSOR_NAME, GENERATION_NAME, WEIGHTS_NAME)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model folder {folder} has no {name} ({path}); write it with `kangaroo export`")
    config = _read_json(paths[CONFIG_NAME])
    if config.get("format") != FORMAT:
        raise ValueError(f"{paths[CONFIG_NAME]}: unknown model folder format {config.get('format')!r} (this version "
                         f"reads {FORMAT})")
    architecture = architecture_from_dict(config["architecture"], paths[CONFIG_NAME])
    architecture.language_model.trust_remote_code = False
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    llm = architecture.language_model
    # the kernel this load can run: `auto` (and a stored flash_attention_2) against its device and dtype
    llm.attn_implementation = resolve_attention(llm.attn_implementation, device, dtype or torch.float32)  # loads into fp32
    model = build_kangaroo(architecture, load_weights=False)
    load_weights(model, paths[WEIGHTS_NAME], base_only=True)  # strict; safetensors only
    kept = read_adapters(folder)
    if kept is not None:  # exported with --keep-adapters: the base weights, then the adapters on them
        load_adapters(model, *kept, where=folder)
    model = cast_model(model, dtype).to(device) if dtype is not None else model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"model folder {folder}: cannot read its tokenizer: {err}") from err
    preprocessing = Preprocessing.from_dict(_read_json(paths[PREPROCESSOR_NAME]))
    generation = GenerationDefaults.from_dict(_read_json(paths[GENERATION_NAME]))
    return LoadedModel(model, tokenizer, preprocessing, generation, folder, llm.attn_implementation)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
