"""Continuous batching (kangaroo.inference.batching) in process: rows join a running batch and
leave it on their own, with the replies they get alone."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def generator_and_prompts(random_model_folder, tmp_path_factory):
    from conftest import random_video

    from kangaroo.inference import Generator, load_pretrained

    folder, _ = random_model_folder
    root = tmp_path_factory.mktemp("batching")
    generator = Generator(load_pretrained(str(folder)), cache_mb=64)
    clip = random_video(root / "clip.mp4", frames=8, seed=3)
    prompts = [generator.prompt([{"role": "user", "content": "Hi"}]),
               generator.prompt([{"role": "user", "content": "<video>\nWhat colour is the screen?"}], clip),
               generator.prompt([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                 {"role": "user", "content": "Describe a long afternoon by the river, in detail."}])]
    plain = Generator(load_pretrained(str(folder)), cache_mb=0)
    edited = generator.prompt([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                               {"role": "user", "content": "Describe a short morning by the sea."}])
    return generator, prompts, (plain, edited)


@pytest.mark.timeout(180)
def test_requests_join_running_rows_and_leave_before_them_with_their_alone_replies(generator_and_prompts):
    """A long reply is decoding; requests sent meanwhile join it (repeated prompts from the prefix
    cache, one edited history sharing only its start with a cached one, one sampled with top_k
    1, which must equal greedy, one sampled with a seed, which must equal its sample alone), get the replies they get alone and are answered while the long row
    decodes on. Before continuous batching they waited for its 2,000 tokens."""
    from kangaroo.inference.batching import BatchScheduler

    generator, prompts, (plain, edited) = generator_and_prompts
    scheduler = BatchScheduler(generator, max_batch=8, max_wait_s=0)
    alone = [scheduler.submit(p, stream=False, temperature=0, max_new_tokens=24).result() for p in prompts]
    assert len({tuple(r.token_ids) for r in alone}) > 1, "the prompts get different replies"
    assert scheduler.stats()["largest_batch"] == 1
    hits = generator.cache.stats()["hits"]

    seeded = dict(stream=False, temperature=1.5, top_p=0.95, seed=7, max_new_tokens=24)
    seeded_alone = scheduler.submit(prompts[1], **seeded).result()
    assert seeded_alone.token_ids != alone[1].token_ids, "a sample at temperature 1.5 is not the greedy reply"

    long = scheduler.submit(prompts[0], temperature=0, max_new_tokens=2000)
    pieces = long.pieces()
    for _ in range(3):
        next(pieces)  # decoding
    joined = [scheduler.submit(p, stream=False, temperature=0, max_new_tokens=24) for p in prompts]
    top_k_1 = scheduler.submit(prompts[1], stream=False, temperature=0.7, top_k=1, max_new_tokens=24)
    seeded_beside = scheduler.submit(prompts[1], **seeded)
    # a history that shares only its start with a cached one: the shared part from the cache
    changed = scheduler.submit(edited, stream=False, temperature=0, max_new_tokens=24)
    replies = [job.result() for job in joined]
    assert changed.result().token_ids == plain.generate([edited], temperature=0, max_new_tokens=24)[0].token_ids
    assert top_k_1.result().token_ids == alone[1].token_ids  # top_k 1 leaves the greedy token only
    assert seeded_beside.result().token_ids == seeded_alone.token_ids  # its own random generator
    assert not long.done, "the long row still decodes: the others joined it and left before it"
    for together, single in zip(replies, alone):
        assert together.token_ids == single.token_ids and together.text == single.text
        assert together.finish_reason == single.finish_reason
    assert generator.cache.stats()["hits"] > hits, "a repeated prompt joined from the prefix cache"
    assert scheduler.stats()["largest_batch"] >= 2

    started = time.monotonic()
    pieces.close()  # the client goes away: its row stops at the next token
    while not long.done and time.monotonic() - started < 60:
        time.sleep(0.01)
    assert long.done and long.finish == "cancelled"
    assert 3 <= len(long.tokens) < 2000
    after = scheduler.submit(prompts[0], stream=False, temperature=0, max_new_tokens=24).result()
    assert after.token_ids == alone[0].token_ids


@pytest.mark.timeout(120)
def test_a_failing_request_among_joining_ones_fails_alone(generator_and_prompts):
    """Two requests join a running row at the same step; one cannot be prefilled (visual
    placeholders without features): it alone gets the error, the other its reply, and the
    running row decodes on to its full reply."""
    from dataclasses import replace

    from kangaroo.inference.batching import BatchScheduler

    generator, prompts, _ = generator_and_prompts
    scheduler = BatchScheduler(generator, max_batch=8, max_wait_s=0)
    expected = scheduler.submit(prompts[0], stream=False, temperature=0, max_new_tokens=24).result()
    whole = scheduler.submit(prompts[2], stream=False, temperature=0, max_new_tokens=200).result()
    running = scheduler.submit(prompts[2], temperature=0, max_new_tokens=200)
    pieces = running.pieces()
    next(pieces)
    broken = replace(prompts[1], pixels=None, timestamps=None, media_key=None)
    with generator._lock:  # the worker waits at its next step: both requests join at the same one
        bad = scheduler.submit(broken, stream=False, temperature=0, max_new_tokens=8)
        good = scheduler.submit(prompts[0], stream=False, temperature=0, max_new_tokens=24)
    with pytest.raises(ValueError, match="visual placeholder"):
        bad.result()
    assert good.result().token_ids == expected.token_ids
    for _ in pieces:
        pass
    assert running.reply.token_ids == whole.token_ids


def test_kept_visual_features_follow_the_frames_a_prompt_keeps(generator_and_prompts, tmp_path):
    """One video, two questions: a long one keeps fewer frames within the prompt budget. Each
    gets the features of its own frames (one key per video would hand the long question the
    short one's features: a placeholder count mismatch)."""
    from conftest import random_video

    generator, _, (plain, _) = generator_and_prompts
    clip = random_video(tmp_path / "budget.mp4", frames=8, seed=5)
    short = [{"role": "user", "content": "<video>\nWhat?"}]
    long = [{"role": "user", "content": "<video>\nWhat colour and shape does it have?"}]
    budget = generator.encoder.prepare.max_tokens
    try:
        generator.encoder.prepare.max_tokens = len(generator.prompt(long, clip).input_ids) - 1
        prompts = [generator.prompt(messages, clip) for messages in (short, long)]
    finally:
        generator.encoder.prepare.max_tokens = budget
    assert prompts[0].media_key == prompts[1].media_key and prompts[1].frames < prompts[0].frames
    for prompt in prompts:
        got = generator.generate([prompt], temperature=0, max_new_tokens=8)[0]
        assert got.token_ids == plain.generate([prompt], temperature=0, max_new_tokens=8)[0].token_ids
