import pytest
import torch
import torch.nn.functional as F

from kangaroo.modules import PatchifyConfig, SpatialTemporalPatchify


def test_uniform_init_equals_average_pooling():
    dim = 6
    patchify = SpatialTemporalPatchify(dim)
    grid = torch.randn(4, 4, 6, dim)  # (t, h, w, c)
    out = patchify(grid)
    pooled = F.avg_pool3d(grid.permute(3, 0, 1, 2).unsqueeze(0), kernel_size=2).squeeze(0).permute(1, 2, 3, 0)
    assert out.shape == (2, 2, 3, dim)
    torch.testing.assert_close(out, pooled)


def test_is_depthwise_with_kernel_equal_stride():
    patchify = SpatialTemporalPatchify(1024)
    conv = patchify.conv
    assert conv.groups == 1024 and conv.kernel_size == (2, 2, 2) and conv.stride == (2, 2, 2)
    assert sum(p.numel() for p in patchify.parameters()) == 1024 * 8 + 1024


def test_single_image_is_repeated_to_fill_the_temporal_kernel():
    dim = 3
    patchify = SpatialTemporalPatchify(dim)
    image = torch.randn(1, 4, 4, dim)
    out = patchify(image)
    spatial = F.avg_pool2d(image[0].permute(2, 0, 1), 2).permute(1, 2, 0)
    assert out.shape == (1, 2, 2, dim)
    torch.testing.assert_close(out[0], spatial)


def test_frame_count_not_divisible_is_an_error():
    with pytest.raises(ValueError, match="got 3 frames"):
        SpatialTemporalPatchify(4)(torch.randn(3, 4, 4, 4))


def test_grid_not_divisible_is_an_error():
    with pytest.raises(ValueError, match="5x4"):
        SpatialTemporalPatchify(4)(torch.randn(2, 5, 4, 4))


def test_random_init_is_not_pooling():
    torch.manual_seed(0)
    patchify = SpatialTemporalPatchify(4, PatchifyConfig(init="random"))
    assert not torch.allclose(patchify.conv.weight, torch.full_like(patchify.conv.weight, 1 / 8))


def test_config_validation():
    with pytest.raises(ValueError, match="init"):
        PatchifyConfig(init="gaussian")
    with pytest.raises(ValueError, match="kernel"):
        PatchifyConfig(kernel=(2, 2))
