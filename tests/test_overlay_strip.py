"""The video overlay strip (`reports.save_overlay_strip`): its size, the frames it picks, the colours at the labels."""

import numpy as np
import PIL.Image
import pytest

from sam2_peft.reports import OBJECT_COLORS, OVERLAY_ALPHA, STRIP_GAP, STRIP_TITLE_PIXELS, save_overlay_strip


def clip(num_frames=20, height=40, width=60):
    """Frame t is a flat grey of brightness t / (T - 1); object 1 a square, object 2 a bar, both in every frame."""
    frames = [np.full((height, width, 3), t / (num_frames - 1)) for t in range(num_frames)]
    labels = np.zeros((height, width), np.int64)
    labels[5:25, 5:25] = 1
    labels[30:38, 10:50] = 2
    return frames, [labels] * num_frames


def cell(pixels, row, column, cell_width, cell_height):
    x0, y0 = column * (cell_width + STRIP_GAP), row * (STRIP_TITLE_PIXELS + cell_height) + STRIP_TITLE_PIXELS
    return pixels[y0 : y0 + cell_height, x0 : x0 + cell_width]


def test_strip_picks_evenly_spaced_frames_and_colours_each_object(tmp_path):
    frames, labels = clip()
    path = save_overlay_strip(frames, labels, tmp_path / "strip.png", max_frames=8, cell_pixels=80)
    image = PIL.Image.open(path)
    # 40 x 60 frames drawn 80 px high are 120 px wide; 8 of them with 7 gaps, one title band.
    assert image.size == (8 * 120 + 7 * STRIP_GAP, STRIP_TITLE_PIXELS + 80)
    pixels = np.asarray(image.convert("RGB")).astype(float) / 255
    picks = [0, 3, 5, 8, 11, 14, 16, 19]  # round(linspace(0, 19, 8))
    for column, t in enumerate(picks):
        drawn = cell(pixels, 0, column, 120, 80)
        grey = t / 19
        # Labels scale by 2: object 1 covers rows/cols 10:50, object 2 rows 60:76, cols 20:100 (interiors below).
        np.testing.assert_allclose(drawn[65, 110], grey, atol=2 / 255)  # background is the frame itself
        for (y, x), value in (((30, 30), 1), ((68, 60), 2)):
            expected = (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * np.asarray(OBJECT_COLORS[value - 1])
            np.testing.assert_allclose(drawn[y, x], expected, atol=2 / 255)
        np.testing.assert_allclose(drawn[10, 30], OBJECT_COLORS[0], atol=2 / 255)  # the outline: full colour
    gap = pixels[STRIP_TITLE_PIXELS:, 120 : 120 + STRIP_GAP]
    assert (gap == 1.0).all()


def test_strip_stacks_one_row_per_label_set_with_the_same_colours(tmp_path):
    frames, labels = clip(num_frames=3)
    frames = [(frame * 255).astype(np.uint8) for frame in frames]  # uint8 frames too
    swapped = [np.where(label > 0, 3 - label, 0) for label in labels]  # objects 1 and 2 trade places
    path = save_overlay_strip(
        frames, {"prediction": labels, "reference": swapped}, tmp_path / "rows.png", titles=["a", "b", "c"],
        cell_pixels=40,
    )  # fmt: skip
    image = PIL.Image.open(path)
    assert image.size == (3 * 60 + 2 * STRIP_GAP, 2 * (STRIP_TITLE_PIXELS + 40))
    pixels = np.asarray(image.convert("RGB")).astype(float) / 255
    top, bottom = cell(pixels, 0, 2, 60, 40), cell(pixels, 1, 2, 60, 40)
    # Frame 2 of 3 is white.
    first = (1 - OVERLAY_ALPHA) + OVERLAY_ALPHA * np.asarray(OBJECT_COLORS[0])
    second = (1 - OVERLAY_ALPHA) + OVERLAY_ALPHA * np.asarray(OBJECT_COLORS[1])
    np.testing.assert_allclose(top[15, 15], first, atol=2 / 255)  # object 1 in the square
    np.testing.assert_allclose(bottom[15, 15], second, atol=2 / 255)  # object 2 there in the second row
    np.testing.assert_allclose(bottom[34, 30], first, atol=2 / 255)
    # The title bands carry text: some dark pixels above each row.
    for row in range(2):
        band = pixels[row * (STRIP_TITLE_PIXELS + 40) : row * (STRIP_TITLE_PIXELS + 40) + STRIP_TITLE_PIXELS]
        assert (band < 0.5).any()


def test_strip_refuses_mismatched_input(tmp_path):
    frames, labels = clip(num_frames=4)
    with pytest.raises(ValueError, match="label maps"):
        save_overlay_strip(frames, labels[:3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not fit its frame"):
        save_overlay_strip(frames, [np.zeros((5, 5), int)] * 4, tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_frames"):
        save_overlay_strip(frames, labels, tmp_path / "x.png", max_frames=0)
