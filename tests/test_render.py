"""Box clipping, padded crops, tile scaling and sheet layout."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deconvis.render import sheets as render


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), y0=st.integers(-15, 15), x0=st.integers(-15, 15),
       bh=st.integers(1, 20), bw=st.integers(1, 20))
def test_crop_padded_matches_pixelwise_definition(h, w, y0, x0, bh, bw):
    img = np.arange(h * w * 3, dtype=np.int32).reshape(h, w, 3) % 251 + 1
    img = img.astype(np.uint8)
    box = (y0, y0 + bh, x0, x0 + bw)
    crop = render.crop_padded(img, box, fill=0)
    assert crop.shape == (bh, bw, 3)
    for yy in range(bh):
        for xx in range(bw):
            sy, sx = y0 + yy, x0 + xx
            want = img[sy, sx] if 0 <= sy < h and 0 <= sx < w else np.zeros(3, np.uint8)
            assert (crop[yy, xx] == want).all()
    (cy0, cy1, cx0, cx1), (pt, pb, pl, pr) = render.clip_box(box, h, w)
    assert cy1 - cy0 + pt + pb == bh and cx1 - cx0 + pl + pr == bw
    assert 0 <= cy0 <= cy1 <= h and 0 <= cx0 <= cx1 <= w
    inside = (crop != 0).all(axis=2)  # all image pixels are non-zero
    assert inside.sum() == (cy1 - cy0) * (cx1 - cx0)


def test_clip_box_examples():
    assert render.clip_box((-1, 6, 123, 130), 128, 128) == ((0, 6, 123, 128), (1, 0, 0, 2))
    assert render.clip_box((0, 10, 0, 10), 128, 128) == ((0, 10, 0, 10), (0, 0, 0, 0))


def test_tile_scale():
    import cv2

    assert render.tile_scale(7, 7, 64, 128) == (70, 70, cv2.INTER_NEAREST)   # integer upscale
    assert render.tile_scale(100, 100, 64, 128) == (100, 100, cv2.INTER_NEAREST)
    assert render.tile_scale(163, 163, 64, 128) == (128, 128, cv2.INTER_AREA)
    assert render.tile_scale(3, 5, 8, 32) == (6, 10, cv2.INTER_NEAREST)


def test_sheet_format_png_where_the_sheets_enlarge_tiles_three_times_or_more():
    assert render.sheet_format([11, 11], 64, 96) == "png"     # AlexNet conv1: 6x
    assert render.sheet_format([22, 22], 64, 96) == "png"     # 3x
    assert render.sheet_format([3, 5], 8, 32) == "jpg"        # 2x
    assert render.sheet_format([51, 51], 64, 96) == "jpg"     # conv2: 2x
    assert render.sheet_format([163, 163], 64, 96) == "jpg"   # shrunk
    assert render.sheet_format([80, 80], 64, 96) == "jpg"     # as is
    assert render.sheet_format(None, 64, 96) == "jpg"         # RF not known yet
    assert render.sheet_format([163, 163], 64, 96, lossless=True) == "png"


def test_tile_paths_and_names():
    assert render.tile_paths("conv1", 3, 0) == {"rec": "tiles/conv1/c0003_0_rec.png",
                                                "img": "tiles/conv1/c0003_0_img.png"}
    assert render.safe_name("features/1#2") == "features_1_2"
    assert render.sheet_name("conv5_3", 12) == "layer_conv5_3_p012.jpg"
    assert render.sheet_name("conv5_3", 12, "png") == "layer_conv5_3_p012.png"


def test_sprite_holds_each_rank_in_its_column_rec_above_img():
    """The addressing results.json documents: rank r in column r, row 0 rec, row 1 img, cell [h, w]."""
    from deconvis.render import sprites

    cell = (5, 7)
    rng = np.random.default_rng(0)
    tiles = {r: (rng.integers(0, 256, cell + (3,), dtype=np.uint8), rng.integers(0, 256, cell + (3,), dtype=np.uint8))
             for r in (0, 1, 3)}  # rank 2 missing: a grey cell
    sprite = sprites.compose(tiles, 4, cell)
    assert sprite.shape == (10, 28, 3)
    for r, (rec, img) in tiles.items():
        assert np.array_equal(sprite[0:5, 7 * r:7 * r + 7], rec) and np.array_equal(sprites.cut(sprite, r, 0, cell), rec)
        assert np.array_equal(sprite[5:10, 7 * r:7 * r + 7], img) and np.array_equal(sprites.cut(sprite, r, 1, cell), img)
    assert (sprites.cut(sprite, 2, 0, cell) == 128).all() and (sprites.cut(sprite, 2, 1, cell) == 128).all()
    assert sprites.sprite_ext((31, 31)) == "png" and sprites.sprite_ext((32, 20)) == "jpg"
    assert sprites.sprite_ext((163, 163), lossless=True) == "png"
    assert sprites.sprite_path("conv1", 3, "jpg") == "tiles/conv1/c0003.jpg"


def test_encode_image_round_trips_png_exactly_and_jpeg_closely(tmp_path):
    import cv2

    from deconvis.io.atomic import write_image

    rng = np.random.default_rng(1)
    smooth = cv2.GaussianBlur(rng.normal(128, 60, (64, 80, 3)), (0, 0), 2).clip(0, 255).astype(np.uint8)
    for ext in ("png", "jpg"):
        path = str(tmp_path / f"x.{ext}")
        write_image(path, smooth)
        back = render.read_rgb(path)
        diff = np.abs(back.astype(int) - smooth.astype(int))
        assert diff.max() == 0 if ext == "png" else diff.mean() < 1.25, (ext, diff.mean())  # JPEG 92: about a level
    assert open(str(tmp_path / "x.jpg"), "rb").read(2) == b"\xff\xd8"
    with pytest.raises(ValueError, match="unknown format"):
        write_image(str(tmp_path / "x.bmp"), smooth)


@pytest.mark.parametrize("k,n", [(9, 5), (4, 1), (3, 7), (1, 2)])
def test_render_sheet_places_every_tile(k, n):
    layout = render.SheetLayout(k=k, th=12, tw=12, per_sheet=16, columns=4)
    rng = np.random.default_rng(k)
    blocks = []
    for c in range(n):
        tiles = []
        for r in range(k):
            rec = np.full((6, 6, 3), 10 + r, np.uint8)
            img = np.full((6, 6, 3), 100 + r, np.uint8)
            tiles.append((rec, img, float(rng.normal())) if r != 1 else None)
        blocks.append((c, tiles))
    sheet = render.render_sheet(blocks, layout, "title")
    h, w = layout.sheet_size(n)
    assert sheet.shape == (h, w, 3) and sheet.dtype == np.uint8
    for r in range(k):
        color_present = ((sheet == 10 + r).all(axis=2)).sum()
        if r == 1:
            assert color_present == 0 or k == 1
        else:
            # each block shows the rec tile (12x12 after nearest upscale), bar label overlap
            assert color_present >= n * 12 * 10


@settings(max_examples=60, deadline=None)
@given(ch=st.integers(3, 170), cw=st.integers(3, 170), k=st.integers(1, 9), missing=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16))
def test_sheet_block_from_the_whole_sprite_equals_each_tile_resized(ch, cw, k, missing, seed):
    # the sheet's tiles cut from one resize of the whole sprite against each tile resized on its own
    # (resize_tile, area when shrinking, nearest when enlarging), on random pixels; winners without a
    # box (not projected) or past k must come out as before
    from types import SimpleNamespace

    from deconvis.render.display import resize_tile
    from deconvis.render.sprites import cut

    rng = np.random.default_rng(seed)
    sprite = rng.integers(0, 256, (2 * ch, k * cw, 3), dtype=np.uint8)
    winners = [SimpleNamespace(rank=r, box=None if r < missing else (0, ch, 0, cw), tiles=None,
                               activation=float(k - r)) for r in range(k)]
    unit = SimpleNamespace(winners=winners, sprite=None)
    layer = SimpleNamespace(cell=[ch, cw], rf=[ch, cw])
    layout = render.layer_layout(layer, k=k, per_sheet=4, columns=2, min_tile=64, max_tile=96)
    got = render.sheet_block(layer, unit, "", layout, sprite)
    assert len(got) == k
    for w, g in zip(winners, got):
        if w.box is None:
            assert g is None
            continue
        for row in (0, 1):
            want = resize_tile(cut(sprite, w.rank, row, (ch, cw)), layout.th, layout.tw)
            np.testing.assert_array_equal(g[row], want)
        assert g[2] == w.activation
