"""Shared fixtures: tiny models built from the package's own tiny configs, and synthetic samples.

Nothing is downloaded: the hub is switched off for every test.
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (the README's `-n 2`) runs one worker per core: each worker, and the processes its
    # tests start (which inherit this), computes on one thread instead of all of them fighting for
    # every core (set before torch loads its OpenMP runtime)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case a plugin loaded torch first

from kangaroo.modules import IGNORE_INDEX, KangarooModel, kangaroo_tiny

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, counted in pytest's summary, where no CUDA device is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared(tmp_path_factory, name: str, build):
    """A session fixture's content, built once for the whole run: ``build(folder)`` writes into
    ``folder`` and returns what the fixture gives. Under pytest-xdist (``-n 2``, the README's test
    command) the workers share it: the first to ask builds it under a file lock, the others wait
    and read what it returned (pickled beside the folder), as pytest-xdist's docs advise for
    session fixtures. Read only, like every session fixture."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # one folder above every worker's own
    stored = root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if stored.exists():
            return pickle.loads(stored.read_bytes())
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
        folder.mkdir()
        value = build(folder)
        stored.write_bytes(pickle.dumps(value))
        return value


@dataclass
class Sample:
    """One training sample as the data pipeline will hand it to the model."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (frames, 3, H, W)
    timestamps: torch.Tensor  # (frames,) seconds


def make_sample(model: KangarooModel, frames: int, text_len: int, seed: int) -> Sample:
    """A prompt, the visual layout of ``frames`` frames, then ``text_len`` labelled answer tokens."""
    g = torch.Generator().manual_seed(seed)
    size = model.vision_tower.image_size
    vocab_text = model.visual_tokens.placeholder - 1  # ordinary tokens lie below the visual ones
    prompt = torch.randint(1, vocab_text, (3,), generator=g).tolist()
    answer = torch.randint(1, vocab_text, (text_len,), generator=g).tolist()
    ids = prompt + model.placeholder_ids(frames) + answer
    labels = [IGNORE_INDEX] * (len(ids) - text_len) + answer
    pixels = torch.randn(frames, 3, size, size, generator=g)
    timestamps = torch.sort(torch.rand(frames, generator=g) * 30.0).values
    return Sample(ids, labels, pixels, timestamps)


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Packs ``samples`` into one row, positions restarting per sample."""
    return {
        "input_ids": torch.tensor([sum((s.input_ids for s in samples), [])]),
        "labels": torch.tensor([sum((s.labels for s in samples), [])]),
        "position_ids": torch.tensor([sum((list(range(len(s.input_ids))) for s in samples), [])]),
        "pixel_values": torch.cat([s.pixel_values for s in samples]),
        "timestamps": torch.cat([s.timestamps for s in samples]),
        "frame_counts": torch.tensor([s.pixel_values.shape[0] for s in samples]),
    }


@pytest.fixture(scope="session")
def tiny_model() -> KangarooModel:
    """Stage 3-5 shape: 112 px, patchify on."""
    torch.manual_seed(0)
    return kangaroo_tiny().eval()


@pytest.fixture(scope="session")
def tiny_model_no_patchify() -> KangarooModel:
    """Stage 1-2 shape: 56 px, no patchify."""
    torch.manual_seed(0)
    return kangaroo_tiny(image_size=56, patchify=False).eval()


# -- data fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from kangaroo.world.tokenizer import build_tiny_tokenizer

    corpus = ["A red circle moves left. A blue square appears.", "一个红色的圆向左移动。",
              "Describe the video. What happens in this video? Answer with the option's letter."] * 20

    def build(path):
        build_tiny_tokenizer(corpus).save_pretrained(path)
        return str(path)

    return shared(tmp_path_factory, "tokenizer", build)


@pytest.fixture(scope="session")
def image_data(tmp_path_factory, tiny_tokenizer_dir):
    """30 captioned images prepared with stage 1's own ``data.prepare`` (shuffled and packed in
    training, so the packer's buffer and the epoch boundary are part of what must resume), the
    frames stored as jpeg: the loader's workers decode them (``num_workers: 2`` in the resume tests). Read only: every test
    that trains on it writes its run elsewhere."""
    from runs import prepare_images

    def build(root):
        prepared = prepare_images(root, tiny_tokenizer_dir, 30, lambda i: 1 + i % 2, frame_format="jpeg")
        assert (root / "prepared" / "rejects.jsonl").read_text() == "", "every sample fits stage 1's budget"
        return prepared

    return shared(tmp_path_factory, "resume-data", build), tiny_tokenizer_dir


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> str:
    """The tiny world at the recipe tests' size (``recipes.SMALL_WORLD``), made once per session.
    Read only: recipes write their stages, data and state into their own work folders."""
    from kangaroo.world import WorldConfig, synthesize
    from recipes import SMALL_WORLD

    def build(root):
        synthesize(str(root / "world"), WorldConfig(**SMALL_WORLD))
        return str(root / "world")

    return shared(tmp_path_factory, "small-world", build)


@pytest.fixture
def stage_yaml(tmp_path, tiny_tokenizer_dir):
    """Writes the tiny stage 3 (configs/kangaroo-tiny/3-pretrain-refinement.yaml) with dotted
    overrides, as a recipe applies them: patchify at 56 px (4 visual tokens a frame pair), 4
    frames, the session's tokenizer and ``max_tokens``/``overflow`` as asked."""
    import yaml

    from kangaroo.recipe.spec import set_dotted
    from kangaroo.training.stage_file import read_stage_yaml

    def write(max_tokens: int = 400, overflow: str = "drop_frames") -> str:
        config = read_stage_yaml(str(ROOT / "configs" / "kangaroo-tiny" / "3-pretrain-refinement.yaml"))
        for dotted, value in {"model.architecture.vision_tower.image_size": 56,
                              "data.train_dir": str(tmp_path / "prepared"), "data.val_dir": None,
                              "data.max_tokens": max_tokens, "data.prepare.tokenizer": tiny_tokenizer_dir,
                              "data.prepare.sampling.num_frames": 4, "data.prepare.max_tokens": max_tokens,
                              "data.prepare.overflow": overflow}.items():
            set_dotted(config, dotted, value)
        path = tmp_path / "stage.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    return write


def random_video(path, frames: int = 20, size: tuple[int, int] = (48, 64), seed: int = 0, **kwargs) -> str:
    """Writes a real video file of random frames; kwargs go to ``write_video`` (fps, times, codec)."""
    import numpy as np

    from kangaroo.data.video import write_video

    rng = np.random.default_rng(seed)
    write_video(str(path), (rng.random((frames, *size, 3)) * 255).astype("uint8"), **kwargs)
    return str(path)


# -- model folders -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def random_model_folder(tmp_path_factory, tiny_tokenizer_dir):
    """A model folder of a randomly initialised tiny model (112 px, patchify), and that model."""
    from transformers import AutoTokenizer

    from kangaroo.data.video import FrameSampling
    from kangaroo.inference import Preprocessing, write_model_folder
    from kangaroo.modules import build_kangaroo, kangaroo_tiny_config

    torch.manual_seed(0)
    config = kangaroo_tiny_config()
    model = build_kangaroo(config)
    folder = tmp_path_factory.mktemp("folder") / "model"
    write_model_folder(str(folder), config, model.state_dict(), AutoTokenizer.from_pretrained(tiny_tokenizer_dir),
                       Preprocessing(image_size=112, sampling=FrameSampling("uniform", num_frames=4, multiple_of=2)))
    return folder, model


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """One short real training run shared by every test that needs a model that learned
    something (tests/trained.py)."""
    from trained import train_colour_model

    return shared(tmp_path_factory, "trained", train_colour_model)


@pytest.fixture(scope="session")
def summariser_folder(tmp_path_factory):
    """A tiny text LLM folder that learned the default summary prompt on the colour world's frame
    captions (tests/trained.py): the summariser of the captioning tests."""
    from trained import train_summariser

    return shared(tmp_path_factory, "summariser", train_summariser)
