import pytest
import torch
import torch.nn.functional as F

from conftest import collate, make_sample
from kangaroo.modules import IGNORE_INDEX, VisualTokens, build_kangaroo, kangaroo_tiny, kangaroo_tiny_config


def test_packed_batch_equals_each_sample_alone(tiny_model):
    samples = [make_sample(tiny_model, 4, 9, seed=1), make_sample(tiny_model, 1, 6, seed=2),
               make_sample(tiny_model, 2, 5, seed=3)]
    with torch.no_grad():
        alone = [tiny_model(**collate([s]), return_logits=True) for s in samples]
        packed = tiny_model(**collate(samples), return_logits=True)
    start = 0
    for sample, out in zip(samples, alone):
        end = start + len(sample.input_ids)
        torch.testing.assert_close(packed.logits[0, start:end], out.logits[0], atol=2e-5, rtol=1e-4)
        # Per-sample loss recomputed from the packed logits equals the sample's own loss.
        logits, labels = packed.logits[0, start : end - 1], torch.tensor(sample.labels[1:])
        torch.testing.assert_close(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX), out.loss,
                                   atol=2e-5, rtol=1e-4)
        start = end
    total = sum(o.loss_sum for o in alone) / sum(o.num_label_tokens for o in alone)
    torch.testing.assert_close(packed.loss, total, atol=2e-5, rtol=1e-4)


def test_loss_counts_labelled_tokens_only(tiny_model):
    sample = make_sample(tiny_model, 2, 7, seed=4)
    with torch.no_grad():
        out = tiny_model(**collate([sample]), return_logits=True)
    labels = torch.tensor(sample.labels)
    assert out.num_label_tokens == (labels[1:] != IGNORE_INDEX).sum() == 7
    manual = F.cross_entropy(out.logits[0, :-1], labels[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)


def test_backward_reaches_every_part():
    model = kangaroo_tiny()  # a fresh one: the shared fixture stays untouched
    batch = collate([make_sample(model, 2, 5, seed=5), make_sample(model, 1, 3, seed=6)])
    model(**batch).loss.backward()
    for name, part in model.parts().items():
        params = list(part.parameters())
        if params:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{name} got no gradient"


@pytest.mark.parametrize("fixture, frames", [("tiny_model_no_patchify", 1), ("tiny_model", 1),
                                             ("tiny_model_no_patchify", 3), ("tiny_model", 4)])
def test_images_and_videos_in_both_stage_shapes(request, fixture, frames):
    model = request.getfixturevalue(fixture)
    sample = make_sample(model, frames, 4, seed=7)
    with torch.no_grad():
        out = model(**collate([sample]))
    assert torch.isfinite(out.loss)
    slots = frames if model.patchify is None else max(frames // 2, 1)
    per_slot = model.vision_tower.tokens_per_frame // (4 if model.patchify is not None else 1)
    assert sample.input_ids.count(model.visual_tokens.placeholder) == slots * per_slot


def test_layout_has_separators_between_slots(tiny_model):
    vt = tiny_model.visual_tokens
    ids = tiny_model.placeholder_ids(6)  # 3 slots of 4x4 tokens
    assert ids[0] == vt.vi_start and ids[-1] == vt.vi_end and ids[-2] == vt.eov
    assert ids.count(vt.eof) == 2 and ids.count(vt.eov) == 1
    assert ids.count(vt.placeholder) == 3 * 16


def test_placeholder_feature_mismatch_names_both_counts(tiny_model):
    sample = make_sample(tiny_model, 4, 3, seed=8)
    batch = collate([sample])
    batch["input_ids"] = batch["input_ids"][:, 5:]  # drop one placeholder token
    batch["labels"], batch["position_ids"] = batch["labels"][:, 5:], batch["position_ids"][:, 5:]
    with pytest.raises(ValueError, match="hold 31 visual placeholder tokens but the media give 32"):
        tiny_model(**batch)


def test_placeholders_without_pixels_is_an_error(tiny_model):
    batch = collate([make_sample(tiny_model, 2, 3, seed=9)])
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=batch["input_ids"], labels=batch["labels"])


def test_text_only_batch_runs(tiny_model):
    ids = torch.randint(1, 500, (1, 12))
    with torch.no_grad():
        out = tiny_model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.num_label_tokens == 11


def test_frame_count_not_divisible_by_temporal_kernel(tiny_model):
    with pytest.raises(ValueError, match="got 3 frames"):
        tiny_model.placeholder_ids(3)
    sample = make_sample(tiny_model, 2, 3, seed=10)
    batch = collate([sample])
    batch["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    batch["timestamps"] = torch.cat([batch["timestamps"], batch["timestamps"][:1]])
    batch["frame_counts"] = torch.tensor([3])
    with pytest.raises(ValueError, match="got 3 frames"):
        tiny_model(**batch)


def test_frame_counts_must_cover_pixel_values(tiny_model):
    batch = collate([make_sample(tiny_model, 2, 3, seed=11)])
    batch["frame_counts"] = torch.tensor([4])
    with pytest.raises(ValueError, match="frame_counts sum to 4 but pixel_values holds 2 frames"):
        tiny_model(**batch)


def test_visual_token_ids_must_fit_the_vocabulary():
    config = kangaroo_tiny_config()
    config.visual_tokens = VisualTokens(5000, 5001, 5002, 5003, 5004)
    with pytest.raises(ValueError, match="vocabulary of 1024"):
        build_kangaroo(config)


def test_visual_token_ids_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        VisualTokens(1, 2, 3, 3, 4)


# -- packed attention for every implementation a config can name --------------------------------

ATTENTION_CASES = [("sdpa", None), ("sdpa", True), ("eager", None), ("flex_attention", None),
                   pytest.param("flash_attention_2", None, marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def models_by_attention():
    """One tiny model per attention implementation, the same weights in each (flex attention
    compiles on its first call: built once, shared by its cases)."""
    built = {}

    def get(implementation: str):
        if implementation not in built:
            config = kangaroo_tiny_config(image_size=56)
            config.language_model.attn_implementation = implementation
            torch.manual_seed(0)
            model = build_kangaroo(config).eval()
            if implementation == "flash_attention_2":
                model = model.to("cuda", torch.bfloat16)
            built[implementation] = model
        return built[implementation]

    return get


def rows_of(samples: list, rows: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``samples`` packed into ``rows`` rows (the first rows hold two samples, the rest one), each
    padded to the longest, padding positions restarting at 0 as the collate does."""
    groups = [samples[:2], *([s] for s in samples[2:])] if rows > 1 else [samples]
    assert len(groups) == rows
    length = max(sum(len(s.input_ids) for s in group) for group in groups)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for group in groups:
        ids = sum((s.input_ids for s in group), [])
        positions = sum((list(range(len(s.input_ids))) for s in group), [])
        pad = length - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["labels"].append(sum((s.labels for s in group), []) + [IGNORE_INDEX] * pad)
        batch["position_ids"].append(positions + list(range(pad)))
    batch = {key: torch.tensor(value) for key, value in batch.items()}
    batch.update(pixel_values=torch.cat([s.pixel_values for s in samples]),
                 timestamps=torch.cat([s.timestamps for s in samples]),
                 frame_counts=torch.tensor([s.pixel_values.shape[0] for s in samples]))
    return batch


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("implementation, flatten", ATTENTION_CASES,
                         ids=["sdpa", "sdpa-one-sequence", "eager", "flex_attention", "flash_attention_2"])
def test_packed_rows_give_each_sample_its_own_logits(models_by_attention, implementation, flatten, rows):
    model = models_by_attention(implementation)
    model.flatten_rows = flatten
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    samples = [make_sample(model, 2, 6, seed=11), make_sample(model, 1, 4, seed=12), make_sample(model, 4, 9, seed=13)]
    move = lambda batch: {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}  # noqa: E731
    # Each sample alone needs no mask at all: on the CPU the reference is sdpa's, the same weights
    # (so flex attention compiles for the two packed shapes only). Static shapes: recompiling
    # flex attention for a second shape with dynamic shapes fails in Inductor's CPU code
    # generation on torch 2.14.1 (a C++ compile error, not a wrong result).
    reference = model if device.type == "cuda" else models_by_attention("sdpa")
    assert torch.equal(reference.projector.weight.cpu().to(dtype), model.projector.weight.cpu()), "the same weights"
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        packed = model(**move(rows_of(samples, rows)), return_logits=True).logits.float()
        alone = [reference(**move(collate([s])), return_logits=True).logits[0].float() for s in samples]
    model.flatten_rows = None
    groups = [[0, 1], [2]] if rows == 2 else [[0, 1, 2]]
    tolerance = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-4)
    for row, members in enumerate(groups):
        start = 0
        for index in members:
            end = start + len(samples[index].input_ids)
            torch.testing.assert_close(packed[row, start:end], alone[index], **tolerance,
                                       msg=lambda m: f"row {row}, sample {index}: {m}")
            start = end


def test_an_attention_mask_beside_packed_rows_is_refused(tiny_model):
    batch = collate([make_sample(tiny_model, 2, 3, seed=14), make_sample(tiny_model, 1, 3, seed=15)])
    with pytest.raises(ValueError, match="attention_mask was given with packed rows"):
        tiny_model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
