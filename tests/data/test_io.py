import io

import numpy as np
import pytest
import PIL.Image
import PIL.ImageOps

from sam2_peft.data.io import DataError, decode_cell, read_file


def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored image
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "photo.jpg"
    PIL.Image.fromarray(pixels).save(path, exif=exif, quality=100)
    shown = read_file(path)
    assert shown.shape == (40, 20, 3)
    assert shown[:10].mean() > 200 and shown[-10:].mean() < 50  # the band is now on top


def test_palette_images_become_colours_but_palette_masks_keep_labels():
    palette = PIL.Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    cell = {"bytes": buffer.getvalue(), "path": None}
    image = decode_cell(cell, what="image")
    assert image.shape == (8, 8, 3) and (image == [255, 0, 0]).all()
    mask = decode_cell(cell, what="mask", is_mask=True)
    assert mask.shape == (8, 8) and (mask == 1).all()


@pytest.mark.parametrize("planes", [3, 4, 2])
def test_16_bit_colour_pngs_keep_every_bit(tmp_path, planes):
    import png

    rng = np.random.default_rng(planes)
    pixels = rng.integers(0, 65536, (6, 5, planes), dtype=np.uint16)
    path = tmp_path / "deep.png"
    writer = png.Writer(5, 6, bitdepth=16, greyscale=planes == 2, alpha=planes in (2, 4))
    with path.open("wb") as handle:
        writer.write(handle, pixels.reshape(6, -1).tolist())
    with PIL.Image.open(path) as image:  # the reason for the detour: PIL keeps only the high byte
        assert np.asarray(image).dtype == np.uint8
    expected = pixels[..., 0] if planes == 2 else pixels  # grey + alpha images become grey, as PIL's LA do
    np.testing.assert_array_equal(read_file(path), expected)
    np.testing.assert_array_equal(decode_cell({"bytes": path.read_bytes(), "path": None}, what="cell"), expected)
    np.testing.assert_array_equal(read_file(path, is_mask=True), pixels)
    path.write_bytes(path.read_bytes()[:60])  # truncated: a clear error naming the file
    with pytest.raises(DataError, match="deep.png: cannot be read as an image"):
        read_file(path)


def test_16_bit_colour_png_follows_its_exif_orientation_like_pil():
    import png

    pixels = (np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3) * 1000 + 7).astype(np.uint16)
    buffer = io.BytesIO()
    png.Writer(3, 2, bitdepth=16, greyscale=False).write(buffer, pixels.reshape(2, -1).tolist())
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    for orientation in range(2, 9):
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        out = io.BytesIO()
        png.write_chunks(out, [chunks[0], (b"eXIf", exif.tobytes()[6:]), *chunks[1:]])  # after IHDR, no "Exif" prefix
        with PIL.Image.open(io.BytesIO(out.getvalue())) as image:  # PIL's own turn of the (8-bit) image
            expected = np.asarray(PIL.ImageOps.exif_transpose(image))
        got = decode_cell({"bytes": out.getvalue(), "path": None}, what="cell")
        assert got.shape == expected.shape, orientation
        np.testing.assert_array_equal(got >> 8, expected, err_msg=str(orientation))
