import numpy as np
import pytest
import torch

from kinema.pipelines.images import to_uint8


def test_to_uint8_rounds_clips_and_zeroes_nan():
    values = torch.tensor([0.0, 0.5, 1.0, float("nan"), 1.2, -0.1, 0.2, 254.6 / 255])
    image = values.view(1, 8, 1).expand(1, 8, 3)
    out = to_uint8(image)
    assert out.dtype == np.uint8 and out.shape == (1, 8, 3) and out.flags.c_contiguous
    # 127.5 rounds to the even 128; 0.2 * 255 = 51; 254.6 -> 255
    assert out[0, :, 0].tolist() == [0, 128, 255, 0, 255, 0, 51, 255]


def test_to_uint8_batches_alpha_and_uint8_input():
    rgba = np.zeros((2, 3, 4, 4), dtype=np.float32)
    rgba[..., 3] = 1.0
    assert to_uint8(rgba).shape == (2, 3, 4, 3) and to_uint8(rgba).max() == 0
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert np.array_equal(to_uint8(u8), u8) and np.array_equal(to_uint8(torch.from_numpy(u8)), u8)
    with pytest.raises(ValueError, match=r"image: expected \(H, W, 3\)"):
        to_uint8(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="image"):
        to_uint8(torch.zeros(4, 4, 2))
