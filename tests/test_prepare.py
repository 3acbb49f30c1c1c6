"""`kangaroo data prepare` end to end: real videos, real LitData chunks, every kind of bad input."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
from litdata import StreamingDataset
from PIL import Image

from conftest import random_video
from kangaroo.modules import IGNORE_INDEX


def zero_frame_video(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # header only, no frame
    return str(path)


@pytest.fixture
def media_dir(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    for i in range(4):
        random_video(root / f"good{i}.mp4", frames=20, fps=10, seed=i)
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(root / "good.png")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    zero_frame_video(root / "zero.mp4")
    data = open(random_video(root / "full.mp4", frames=60, fps=10, size=(64, 64)), "rb").read()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return root


def manifest(tmp_path, media_dir):
    good = [{"id": f"good{i}", "video": f"media/good{i}.mp4", "task": "caption", "caption": f"A red circle {i}."}
            for i in range(4)]
    good.append({"id": "image", "image": "media/good.png", "task": "mcq", "question": "Colour?",
                 "options": ["red", "blue", "green", "grey"], "answer": "D"})
    good.append({"id": "text", "conversations": [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}]})
    bad = {
        "missing": {"video": "media/nope.mp4"}, "empty": {"video": "media/empty.mp4"},
        "corrupt": {"video": "media/corrupt.mp4"}, "zero": {"video": "media/zero.mp4"},
        "truncated": {"video": "media/truncated.mp4"}, "broken_image": {"image": "media/broken.png"},
        "outside": {"video": "/etc/hostname"},
    }
    lines = [json.dumps(r) for r in good]
    lines += [json.dumps({"id": k, **v, "task": "caption", "caption": "x"}) for k, v in bad.items()]
    lines += ["{this is not json", json.dumps({"id": "noassistant", "conversations": [{"role": "user", "content": "x"}]})]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), {r["id"] for r in good}


def kangaroo(*args):
    return subprocess.run([sys.executable, "-m", "kangaroo.cli", *args], capture_output=True, text=True)


def test_prepare_keeps_every_good_sample_and_lists_every_bad_one(tmp_path, media_dir, stage_yaml):
    path, good_ids = manifest(tmp_path, media_dir)
    out = tmp_path / "prepared"
    result = kangaroo("data", "prepare", "--manifest", path, "--output", str(out), "--stage", stage_yaml(),
                      "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"prepared {len(good_ids)} samples" in result.stdout and "skipped 9" in result.stdout
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects.keys() == {"missing", "empty", "corrupt", "zero", "truncated", "broken_image", "outside",
                              "line 14", "noassistant"}
    assert rejects["missing"].startswith("missing file")
    assert rejects["zero"] in ("video has no frames", "file has no video stream")
    assert rejects["broken_image"].startswith("unreadable image")
    assert "outside the allowed roots" in rejects["outside"]
    assert rejects["line 14"].startswith("malformed JSON")

    records = {r["id"]: r for r in StreamingDataset(str(out))}
    assert records.keys() == good_ids
    video = records["good0"]
    assert video["pixels"].shape == (4, 3, 56, 56) and video["timestamps"].tolist() == sorted(video["timestamps"])
    assert video["input_ids"].tolist().count(1019) == 2 * 4  # 2 slots of 2x2 tokens after patchify
    assert len(video["input_ids"]) == len(video["labels"]) == video["num_tokens"]
    assert records["image"]["pixels"].shape[0] == 1 and records["text"]["pixels"].shape[0] == 0
    assert 0 <= records["image"]["timestamps"][0] < 60
    labels = video["labels"]
    assert (labels[labels != IGNORE_INDEX] == video["input_ids"][labels != IGNORE_INDEX]).all()


def test_strict_fails_and_existing_output_is_protected(tmp_path, media_dir, stage_yaml):
    path, _ = manifest(tmp_path, media_dir)
    out = tmp_path / "prepared"
    strict = kangaroo("data", "prepare", "--manifest", path, "--output", str(out), "--stage", stage_yaml(), "--strict")
    assert strict.returncode == 2 and "--strict" in strict.stderr
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("precious")
    again = kangaroo("data", "prepare", "--manifest", path, "--output", str(out), "--stage", stage_yaml())
    assert again.returncode == 2 and "--overwrite" in again.stderr and (out / "keep.txt").exists()


def test_nothing_usable_exits_non_zero(tmp_path, stage_yaml):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "video": "nope.mp4", "task": "caption", "caption": "x"}) + "\n{bad\n")
    result = kangaroo("data", "prepare", "--manifest", str(path), "--output", str(tmp_path / "o"),
                      "--stage", stage_yaml())
    assert result.returncode == 1 and "no usable sample" in result.stderr


@pytest.mark.parametrize("overflow", ["drop_frames", "skip"])
def test_samples_over_the_budget(tmp_path, stage_yaml, overflow):
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.data.prepare import NothingUsable, prepare_dataset
    from kangaroo.modules.builder import visual_layout

    random_video(tmp_path / "v.mp4", frames=40, fps=10)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "long", "video": "v.mp4", "task": "caption", "caption": "A red circle."}) + "\n")
    sections = load_stage_file(stage_yaml(max_tokens=60, overflow=overflow))
    prepare, layout = sections["data"].prepare, visual_layout(sections["model"].architecture)
    prepare.sampling.num_frames = 16  # 8 slots x (4 + 1) tokens: over a 60-token budget
    if overflow == "skip":
        with pytest.raises(NothingUsable):
            prepare_dataset(str(path), str(tmp_path / "o"), prepare, layout)
        reason = json.loads((tmp_path / "o" / "rejects.jsonl").read_text())["reason"]
        assert "over the budget of 60" in reason
        return
    prepare_dataset(str(path), str(tmp_path / "o"), prepare, layout)
    (record,) = list(StreamingDataset(str(tmp_path / "o")))
    assert record["num_tokens"] <= 60 and record["pixels"].shape[0] % 2 == 0 and record["pixels"].shape[0] < 16
    gaps = np.diff(record["timestamps"])
    assert gaps.max() < 2.5 * gaps.min()  # dropped evenly, not cut from the end


def test_samples_are_written_in_a_seeded_shuffled_order_unless_asked_not_to(tmp_path, stage_yaml):
    # LitData never shuffles across chunks: a manifest grouped by kind must not stream grouped.
    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout

    path = tmp_path / "m.jsonl"
    ids = [f"{kind}{i}" for kind in "ab" for i in range(20)]
    path.write_text("".join(json.dumps({"id": i, "conversations": [{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": i}]}) + "\n"
                            for i in ids))
    sections = load_stage_file(stage_yaml())
    prepare, layout = sections["data"].prepare, visual_layout(sections["model"].architecture)
    orders = {}
    for shuffle in (True, False):
        prepare.shuffle = shuffle
        prepare_dataset(str(path), str(tmp_path / f"o{shuffle}"), prepare, layout)
        orders[shuffle] = [r["id"] for r in StreamingDataset(str(tmp_path / f"o{shuffle}"))]
    assert orders[False] == ids
    assert sorted(orders[True]) == sorted(ids) and orders[True] != ids
    first_half = orders[True][:20]
    assert 5 <= sum(i.startswith("a") for i in first_half) <= 15


def test_forkserver_workers_write_the_same_records_and_the_start_method_is_put_back(tmp_path, stage_yaml):
    # the recipe runner prepares ten datasets in a row with workers forked from one server
    import multiprocessing

    from kangaroo.training.stage_file import load_stage_file
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout

    for i in range(3):
        random_video(tmp_path / f"v{i}.mp4", frames=20, fps=10, seed=i)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"v{i}", "video": f"v{i}.mp4", "task": "caption", "caption": "A shape."})
                            + "\n" for i in range(3)))
    sections = load_stage_file(stage_yaml())
    prepare, layout = sections["data"].prepare, visual_layout(sections["model"].architecture)
    before = multiprocessing.get_start_method(allow_none=True)
    with pytest.raises(ValueError, match="spawn or forkserver"):
        prepare_dataset(str(path), str(tmp_path / "fork"), prepare, layout, start_method="fork")
    assert not (tmp_path / "fork").exists()
    records = {}
    for method in ("spawn", "forkserver", "forkserver"):
        out = tmp_path / f"o-{method}"
        report = prepare_dataset(str(path), str(out), prepare, layout, start_method=method, overwrite=True)
        assert report.prepared == 3 and multiprocessing.get_start_method(allow_none=True) == before
        records[method] = list(StreamingDataset(str(out)))
    for a, b in zip(records["spawn"], records["forkserver"], strict=True):
        assert a["id"] == b["id"] and np.array_equal(a["input_ids"], b["input_ids"])
        assert np.array_equal(np.asarray(a["pixels"]), np.asarray(b["pixels"]))


def _records(directory):
    return [{key: np.asarray(value) if key in ("input_ids", "labels", "pixels", "timestamps") else value
             for key, value in record.items()} for record in StreamingDataset(str(directory))]


def test_two_shards_prepared_by_two_processes_merge_into_the_one_pass_dataset(tmp_path, media_dir, stage_yaml):
    # as two machines would: each process reads the whole manifest, encodes its slice, writes its part
    from kangaroo.data.prepare import prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file

    path, good = manifest(tmp_path, media_dir)
    extra = [json.dumps({"id": f"t{i}", "conversations": [{"role": "user", "content": f"Say {i}"},
                                                          {"role": "assistant", "content": f"{i} " * (1 + i % 5)}]})
             for i in range(14)]
    extra.append(json.dumps({"id": "good1", "task": "caption", "caption": "a second line with an id taken"}))
    with open(path, "a") as out:
        out.write("\n".join(extra) + "\n")
    config = stage_yaml()
    parts = [subprocess.Popen([sys.executable, "-m", "kangaroo.cli", "data", "prepare", "--manifest", path,
                               "--stage", config, "--output", str(tmp_path / "sharded"), "--shard", f"{k}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outputs = [part.communicate(timeout=300)[0] for part in parts]
    assert [part.returncode for part in parts] == [0, 0], outputs
    assert (tmp_path / "sharded" / "parts" / "0-of-2" / "part.json").exists()
    merged = subprocess.run([sys.executable, "-m", "kangaroo.cli", "data", "merge", str(tmp_path / "sharded")],
                            capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert "prepared 20 samples" in merged.stdout and "skipped 10" in merged.stdout
    assert not (tmp_path / "sharded" / "parts").exists()

    sections = load_stage_file(config)
    # two writers in one pass keep the sorted order too (each writes its own contiguous share)
    prepare_dataset(path, str(tmp_path / "one"), sections["data"].prepare,
                    visual_layout(sections["model"].architecture), workers=2)
    one, joined = _records(tmp_path / "one"), _records(tmp_path / "sharded")
    assert len(one) == 20 and {r["id"] for r in one} == good | {f"t{i}" for i in range(14)}
    assert [r["id"] for r in joined] == [r["id"] for r in one]
    assert [r["id"] for r in one] != sorted(r["id"] for r in one)  # shuffled, so the order itself is compared
    for a, b in zip(one, joined, strict=True):
        for key in ("input_ids", "labels", "pixels", "timestamps"):
            assert np.array_equal(a[key], b[key]), (a["id"], key)

    def rejects(directory):
        return sorted(map(tuple, (json.loads(line).values() for line in (directory / "rejects.jsonl").open())))

    assert rejects(tmp_path / "sharded") == rejects(tmp_path / "one")
    assert ("good1", "duplicate id: an earlier line has the same id") in rejects(tmp_path / "one")
    assert len(rejects(tmp_path / "one")) == 10


def test_merge_refuses_missing_parts_and_prepare_refuses_a_bad_shard(tmp_path, stage_yaml):
    from kangaroo.data.prepare import merge_parts

    part = tmp_path / "out" / "parts" / "0-of-2"
    part.mkdir(parents=True)
    info = {"shard": 0, "of": 2, "usable": 3, "fingerprint": "a", "prepared": 2, "rejected": 0}
    (part / "part.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"part 1 of 2 is missing .*--shard 1/2"):
        merge_parts(str(tmp_path / "out"))
    (tmp_path / "out" / "parts" / "1-of-2").mkdir()
    (tmp_path / "out" / "parts" / "1-of-2" / "part.json").write_text(json.dumps({**info, "fingerprint": "b"}))
    with pytest.raises(ValueError, match="different manifests or settings"):
        merge_parts(str(tmp_path / "out"))
    (tmp_path / "out" / "parts" / "1-of-3").mkdir()
    with pytest.raises(ValueError, match="different shard counts"):
        merge_parts(str(tmp_path / "out"))
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "conversations": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}) + "\n")
    for shard in ("2/2", "0/1", "x"):
        result = subprocess.run([sys.executable, "-m", "kangaroo.cli", "data", "prepare", "--manifest",
                                 str(tmp_path / "m.jsonl"), "--stage", stage_yaml(), "--output",
                                 str(tmp_path / "o"), "--shard", shard], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "--shard" in result.stderr, result.stderr


def test_one_usable_sample_over_two_shards_merges_and_bad_text_is_rejected(tmp_path, stage_yaml):
    from kangaroo.data.prepare import merge_parts, prepare_dataset
    from kangaroo.modules.builder import visual_layout
    from kangaroo.training.stage_file import load_stage_file

    good = json.dumps({"id": "a", "conversations": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello"}]})
    lines = [b'{"id": "latin", "task": "caption", "caption": "caf\xe9"}',  # not UTF-8
             b'{"id": "\\ud800", "task": "caption", "caption": "x"}',  # a lone surrogate
             good.encode()]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    sections = load_stage_file(stage_yaml())
    prepare, layout = sections["data"].prepare, visual_layout(sections["model"].architecture)
    reports = [prepare_dataset(str(path), str(tmp_path / "out"), prepare, layout, shard=(k, 2)) for k in range(2)]
    assert [r.prepared for r in reports] == [0, 1]
    merged = merge_parts(str(tmp_path / "out"))  # one part holds every sample: copied as it is
    assert merged.prepared == 1 and merged.rejected == 2
    assert [r["id"] for r in StreamingDataset(str(tmp_path / "out"))] == ["a"]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").open()]
    assert sorted(r["reason"].split(":")[0] for r in rejects) == ["not UTF-8", "the id is not valid Unicode (a lone surrogate)"]
    with pytest.raises(ValueError, match="N be at least 2"):
        prepare_dataset(str(path), str(tmp_path / "o1"), prepare, layout, shard=(0, 1))
