"""RGB <-> BGR swap (deconvis.io.rgb) against NumPy's channel indexing, on random pixels."""
import cv2
import numpy as np
import pytest

from deconvis.io.atomic import encode_image
from deconvis.io.rgb import swap_red_blue

RNG = np.random.default_rng(5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int32])
@pytest.mark.parametrize("channels", [3, 4, 5])
def test_swap_exchanges_channels_0_and_2_only(dtype, channels):
    img = (RNG.random((7, 9, channels)) * 200).astype(dtype)
    want = img[:, :, [2, 1, 0] + list(range(3, channels))]
    got = swap_red_blue(img)
    assert got.dtype == img.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(swap_red_blue(got), img)  # its own inverse


def test_swap_of_a_strided_view_and_of_grey():
    big = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    view = big[2:17:2, 3:29:3]  # rows and columns with steps: not contiguous
    np.testing.assert_array_equal(swap_red_blue(view), view[:, :, ::-1])
    grey = big[:, :, 0]
    assert swap_red_blue(grey) is grey
    two = big[:, :, :2]
    assert swap_red_blue(two) is two


def test_encoded_png_decodes_to_the_same_rgb():
    rgb = RNG.integers(0, 256, (11, 13, 3), dtype=np.uint8)
    bgr = cv2.imdecode(np.frombuffer(encode_image(rgb, "png"), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(bgr[:, :, ::-1], rgb)
