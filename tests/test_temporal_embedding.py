import math

import pytest
import torch

from kangaroo.modules import TemporalPositionEmbedding


def test_matches_paper_equation_3():
    dim, theta = 8, 10000.0
    tpe = TemporalPositionEmbedding(dim, theta)
    t = 3.7
    expected = [
        (math.sin if i % 2 == 0 else math.cos)(t / theta ** (i / dim)) for i in range(dim)
    ]
    torch.testing.assert_close(tpe.embed(torch.tensor([t]))[0], torch.tensor(expected))


def test_uses_float_timestamps_not_indices():
    tpe = TemporalPositionEmbedding(64)
    emb = tpe.embed(torch.tensor([1.0, 1.25, 1.0]))
    assert not torch.allclose(emb[0], emb[1]), "frames 0.25 s apart must get different embeddings"
    torch.testing.assert_close(emb[0], emb[2])


def test_adds_one_embedding_per_frame_to_every_token():
    tpe = TemporalPositionEmbedding(16)
    features = torch.randn(3, 5, 16)
    timestamps = torch.tensor([0.0, 0.5, 7.25])
    out = tpe(features, timestamps)
    delta = out - features
    for frame in range(3):
        for token in range(5):
            torch.testing.assert_close(delta[frame, token], tpe.embed(timestamps[frame : frame + 1])[0])


def test_timestamp_count_must_match_frames():
    with pytest.raises(ValueError, match="2 timestamps for 3 frames"):
        TemporalPositionEmbedding(4)(torch.zeros(3, 2, 4), torch.zeros(2))


def test_has_no_state():
    tpe = TemporalPositionEmbedding(1024)
    assert list(tpe.parameters()) == [] and list(tpe.buffers()) == []
