"""Curation filters on real video files written here, the pipeline's outputs, bad input, and
resuming after a real kill."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kangaroo.curate import (CaptionRepetitionFilter, CategoryBalance, Item, SceneCut, StaticSceneFilter,
                             TextCoverageFilter, TextDetector, caption_repetition, curate, default_filters,
                             load_filters)
from kangaroo.world.demo_clips import moving_frames, write_demo_set
from kangaroo.curate.pipeline import describe
from kangaroo.data.video import FrameSampling, index_video, read_video, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    write_demo_set(str(folder))
    return folder


@pytest.fixture(scope="module")
def curated(demo, tmp_path_factory) -> tuple[dict, dict[str, dict], list[dict]]:
    """The default filters over the demo set, in one process: (report, reasons by id, kept lines)."""
    out = tmp_path_factory.mktemp("curated") / "kept.jsonl"
    report = curate(str(demo / "manifest.jsonl"), str(out), progress=False)
    reasons = {r["id"]: r for r in map(json.loads, out.with_suffix(".reasons.jsonl").read_text().splitlines())}
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    return report.data, reasons, kept


def test_each_filter_removes_its_case_and_keeps_the_clean_clip(demo, curated):
    _, reasons, kept = curated
    expected = {json.loads(line)["id"]: json.loads(line)["meta"]["expect"]
                for line in (demo / "manifest.jsonl").read_text().splitlines()}
    for sample_id, expect in expected.items():
        reason = reasons[sample_id]
        if expect is None:
            assert reason["status"] == "kept", reason
        else:
            assert (reason["status"], reason["filter"]) == ("removed", expect), reason
    scores = reasons["moving"]["scores"]  # the clean clip passes every filter with room to spare
    assert scores["text"] < 0.02 and scores["face"] < 0.02 and scores["static"] > 0.3
    assert scores["caption_repetition"] < 0.3
    assert reasons["text"]["scores"]["text"] > 0.3 and reasons["face"]["scores"]["face"] > 0.15
    assert reasons["still"]["scores"]["static"] < 0.01
    assert {line["id"] for line in kept} == {"moving", "two_scenes-clip000", "two_scenes-clip001"}


def test_two_concatenated_scenes_are_split_at_the_cut(demo, curated, tmp_path):
    report, _, kept = curated
    clips = [line for line in kept if line["id"].startswith("two_scenes")]
    assert [(c["meta"]["clip_of"]["start"], c["meta"]["clip_of"]["end"]) for c in clips] == [(0.0, 2.5), (2.5, 5.0)]
    out_dir = Path(report["output"]).parent
    for clip in clips:  # real files, relative to the output manifest, 25 frames each at the source's timing
        index = index_video(str(out_dir / clip["video"]))
        assert len(index.times) == 25 and index.times[0] == 0.0 and abs(index.duration - 2.5) < 1e-6
    first = read_video(str(out_dir / clips[0]["video"]), FrameSampling(num_frames=1)).frames[0]
    second = read_video(str(out_dir / clips[1]["video"]), FrameSampling(num_frames=1)).frames[0]
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 30  # two different scenes
    moving = next(line for line in kept if line["id"] == "moving")  # one scene: kept as it is
    assert (out_dir / moving["video"]).resolve() == (demo / "videos" / "moving.mp4").resolve()
    # short scenes are dropped, long ones split into equal parts
    frames = np.concatenate([moving_frames(np.random.default_rng(1), 2.0),
                             moving_frames(np.random.default_rng(2), 4.0, colour=(200, 30, 30))[:, ::-1]])
    write_video(str(tmp_path / "short_long.mp4"), frames, fps=10)
    spans, scenes = SceneCut(min_seconds=2.5, max_seconds=2.0).spans(str(tmp_path / "short_long.mp4"))
    assert scenes == 2 and [(round(a, 2), round(b, 2)) for a, b in spans] == [(2.0, 4.0), (4.0, 6.0)]


def test_report_counts_every_filter(curated):
    report, _, _ = curated
    by_name = {f["name"]: f for f in report["filters"]}
    assert [f["name"] for f in report["filters"]] == [f.name for f in default_filters()]
    assert by_name["scene_cut"]["examined"] == 7 and by_name["scene_cut"]["clips_written"] == 2
    assert by_name["static"]["examined"] == 8 and by_name["static"]["removed"] == 1  # 6 lines + 2 clips
    assert by_name["text"]["settings"]["max_coverage"] == 0.1
    assert by_name["text"]["settings"]["detector"]["class"] == "RapidOCRTextDetector"
    assert all(f["seconds"] >= 0 and f["errors"] == 0 for f in report["filters"])
    assert (report["lines"], report["kept_lines"], report["kept"], report["removed"]) == (7, 2, 3, 5)


def test_caption_repetition_in_english_and_chinese():
    assert caption_repetition("The dog runs in the park. The dog runs in the big park.") > 0.8
    assert caption_repetition("A dog runs across a park. Then it jumps into the lake for a stick.") < 0.2
    assert caption_repetition("一只狗在公园里奔跑。一只狗在公园里奔跑。") == 1.0
    assert caption_repetition("一只狗在公园里奔跑。随后它跳进湖里捡起一根树枝。") < 0.2
    assert caption_repetition("One sentence only.") == 0.0
    keep = CaptionRepetitionFilter(max_iou=0.6)
    assert not keep.check(Item("a", {"caption": "A cat sleeps. A cat sleeps."})).keep
    assert keep.check(Item("b", {"conversations": [{"role": "assistant", "content": "A cat sleeps. It wakes up."}]})).keep


def test_category_balance_caps_large_categories_and_leaves_the_others(tmp_path):
    rng = random.Random(0)
    lines = [{"id": f"big{i}", "category": "big"} for i in range(600)]
    lines += [{"id": f"mid{i}", "meta": {"category": "mid"}} for i in range(40)]
    lines += [{"id": f"c{k}-{i}", "meta": {"category": f"small{k}"}} for k in range(400) for i in range(rng.randint(1, 4))]
    lines += [{"id": f"none{i}"} for i in range(20)]
    rng.shuffle(lines)
    manifest = tmp_path / "skewed.jsonl"
    manifest.write_text("".join(json.dumps({**line, "caption": "A plain caption."}) + "\n" for line in lines))
    report = curate(str(manifest), str(tmp_path / "out.jsonl"), [CaptionRepetitionFilter(), CategoryBalance()],
                    progress=False)
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    categories = [line.get("category") or line.get("meta", {}).get("category") for line in kept]
    counts = {c: categories.count(c) for c in set(categories) if c}
    assert max(counts.values()) / len(kept) < 0.01
    small = [line for line in lines if str(line.get("meta", {}).get("category", "")).startswith("small")]
    assert {line["id"] for line in small} <= {line["id"] for line in kept}  # untouched
    assert sum(1 for c in categories if c is None) == 20
    details = report.data["filters"][-1]
    assert details["removed"] == len(lines) - len(kept) > 600 - 10
    assert set(details["details"]["resampled"]) == {"big", "mid"}
    reasons = [json.loads(line) for line in (tmp_path / "out.reasons.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "removed" and r["filter"] == "category_balance" for r in reasons) == details["removed"]
    # the same seed keeps the same lines
    again = curate(str(manifest), str(tmp_path / "again.jsonl"), [CategoryBalance()], progress=False)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "out.jsonl").read_text() and again.data["kept"] == len(kept)
    # too few categories to end below 1%: nothing is removed and the report says why
    few = CategoryBalance().select([Item(str(i), {"category": str(i % 5)}) for i in range(50)])
    assert len(few[0]) == 50 and not few[1] and "cannot all end below" in few[2]["note"]


class EverythingIsText(TextDetector):
    """A stand-in detector: the whole frame is one text box."""

    def __call__(self, frame):
        height, width = frame.shape[:2]
        return [[(0, 0), (width, 0), (width, height), (0, height)]]


def test_a_detector_plugs_in(demo):
    item = Item("moving", {}, str(demo / "videos" / "moving.mp4"))
    verdict = TextCoverageFilter(detector=EverythingIsText()).check(item)
    assert not verdict.keep and verdict.score == pytest.approx(1.0)
    assert TextCoverageFilter().check(item).keep


def test_the_config_file_spells_out_the_defaults_and_bad_keys_are_refused(tmp_path):
    assert describe(load_filters(str(ROOT / "configs" / "curate.yaml"))) == describe(default_filters())
    config = yaml.safe_load((ROOT / "configs" / "curate.yaml").read_text())
    config["filters"][1]["init_args"]["min_flw"] = 0.5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="min_flw"):
        load_filters(str(tmp_path / "bad.yaml"))
    (tmp_path / "empty.yaml").write_text("filters: []\n")
    with pytest.raises(ValueError, match="non-empty `filters:`"):
        load_filters(str(tmp_path / "empty.yaml"))


def test_bad_input_is_reported_and_the_rest_processed(demo, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(demo / "videos" / "moving.mp4", videos / "good.mp4")
    data = (demo / "videos" / "moving.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (videos / "corrupt.mp4").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
    (videos / "empty.mp4").write_bytes(b"")
    good = {"caption": "A disc rolls."}
    lines = [json.dumps({"id": "good", "video": "videos/good.mp4", **good}),
             json.dumps({"id": "truncated", "video": "videos/truncated.mp4", **good}),
             json.dumps({"id": "corrupt", "video": "videos/corrupt.mp4", **good}),
             json.dumps({"id": "empty", "video": "videos/empty.mp4", **good}),
             json.dumps({"id": "missing", "video": "videos/missing.mp4", **good}),
             '{"id": "broken", "video": ',
             json.dumps(["not", "an", "object"]),
             json.dumps({"video": "videos/good.mp4"}),
             json.dumps({"id": "good", "video": "videos/good.mp4", **good}),
             json.dumps({"id": "text-only", **good})]
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    report = curate(str(manifest), str(tmp_path / "out" / "kept.jsonl"), [SceneCut(), StaticSceneFilter()],
                    progress=False)
    reasons = {r["line"]: r for r in map(json.loads, (tmp_path / "out" / "kept.reasons.jsonl").read_text().splitlines())}
    assert len(reasons) == len(lines)
    assert reasons[1]["status"] == "kept" and reasons[10]["status"] == "kept"
    for line in (2, 3, 4, 5, 6, 7, 8, 9):
        assert reasons[line]["status"] == "error" and reasons[line]["reason"], reasons[line]
    assert "missing file" in reasons[5]["reason"]
    assert "malformed JSON" in reasons[6]["reason"] and "JSON object" in reasons[7]["reason"]
    assert "'id'" in reasons[8]["reason"] and "duplicate id: line 1" in reasons[9]["reason"]
    assert report.data["errors"] == 8 and report.data["kept_lines"] == 2
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    assert [k["id"] for k in kept] == ["good", "text-only"]
    assert (tmp_path / "out" / kept[0]["video"]).resolve() == (videos / "good.mp4").resolve()  # relative to the output
    with pytest.raises(ValueError, match="would overwrite the manifest"):
        curate(str(manifest), str(manifest), [SceneCut()], progress=False)


def _curate_command(manifest: Path, output: Path, *extra: str, config: Path = ROOT / "configs" / "curate.yaml"):
    return [sys.executable, "-m", "kangaroo.cli", "curate", "--manifest", str(manifest), "--output", str(output),
            "--filters", str(config), *extra]


def test_a_killed_run_continues_where_it_stopped(tmp_path, curated):
    demo = tmp_path / "demo"
    manifest = write_demo_set(str(demo), copies=3)
    out = tmp_path / "out" / "kept.jsonl"
    journal = out.with_suffix(".progress.jsonl")
    process = subprocess.Popen(_curate_command(Path(manifest), out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 4):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = journal.read_text().splitlines()
    assert 4 <= len(before) < 22, "the kill must land mid-run"
    # a rerun with other settings is refused rather than mixing two runs
    other = tmp_path / "other.yaml"
    other.write_text("filters:\n  - class_path: kangaroo.curate.StaticSceneFilter\n")
    refused = subprocess.run(_curate_command(Path(manifest), out, config=other), capture_output=True, text=True)
    assert refused.returncode == 2 and "--restart" in refused.stderr
    result = subprocess.run(_curate_command(Path(manifest), out, "--workers", "2"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    after = journal.read_text().splitlines()
    assert after[: len(before) - 1] == before[:-1]  # finished lines kept as they were (the last may be torn)
    assert len(after) == 22  # header + 21 lines, none done twice
    reasons = [json.loads(line) for line in out.with_suffix(".reasons.jsonl").read_text().splitlines()]
    expect = {json.loads(line)["id"]: json.loads(line)["meta"]["expect"] for line in Path(manifest).read_text().splitlines()}
    assert [r["line"] for r in reasons] == list(range(1, 22))
    for reason in reasons:  # the same decisions as an uninterrupted run
        removed_by = reason["filter"] if reason["status"] == "removed" else None
        assert reason["status"] != "error" and removed_by == expect[reason["id"]], reason
    assert len(out.read_text().splitlines()) == 3 * len(curated[2])
