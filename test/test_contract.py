"""The grand-challenge contract: locating and reading the input, writing outputs atomically."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from algorithm.contract import (INPUT_FOLDER, INPUT_SLUG, OUTPUT_FRAME, OUTPUT_MASK, OutputTransaction,
                                find_input_image, read_stack, to_uint8, write_outputs)
from algorithm.errors import InputError, OutputError


def write_image(path, array, spacing=(0.28, 0.28, 1.0), vector=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def case_folder(tmp_path, names=("case.mha",), inputs_json=None):
    folder = tmp_path / "input" / INPUT_FOLDER
    for name in names:
        write_image(folder / name, np.zeros((6, 8, 10), dtype=np.uint8))
    if inputs_json is not None:
        (tmp_path / "input" / "inputs.json").write_text(json.dumps(inputs_json))
    return tmp_path / "input"


GC_INPUTS = [{"interface": {"slug": INPUT_SLUG, "kind": "Image",
                            "relative_path": str(INPUT_FOLDER)}, "image": {"name": "x.mha"}}]


def test_finds_the_single_image(tmp_path):
    assert find_input_image(case_folder(tmp_path)).name == "case.mha"


def test_inputs_json_names_the_folder(tmp_path):
    assert find_input_image(case_folder(tmp_path, inputs_json=GC_INPUTS)).name == "case.mha"


def test_two_images_are_ambiguous(tmp_path):
    with pytest.raises(InputError, match="2 images"):
        find_input_image(case_folder(tmp_path, names=("a.mha", "b.mha")))


def test_inputs_json_without_our_socket(tmp_path):
    bad = [{"interface": {"slug": "something-else", "relative_path": "x"}}]
    with pytest.raises(InputError, match="no socket"):
        find_input_image(case_folder(tmp_path, inputs_json=bad))


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        find_input_image(tmp_path / "nope")


def test_reads_uint8_stack_with_geometry(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (12, 20, 30), dtype=np.uint8)
    stack = read_stack(write_image(tmp_path / "s.mha", array, spacing=(0.28, 0.28, 1.0)))
    assert stack.shape == (12, 20, 30) and np.array_equal(stack.array, array)
    assert stack.spacing == pytest.approx((0.28, 0.28, 1.0))


def test_rgb_is_averaged_to_grey(tmp_path):
    grey = np.random.default_rng(1).integers(0, 255, (4, 10, 12), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    stack = read_stack(write_image(tmp_path / "rgb.mha", rgb, vector=True))
    assert stack.shape == (4, 10, 12) and np.array_equal(stack.array, grey)
    assert "averaged" in stack.note


def test_to_uint8_keeps_small_ints_and_rescales_wide_floats():
    small = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    assert np.array_equal(to_uint8(small)[0], small.astype(np.uint8))
    wide = np.linspace(-1000, 3000, 24, dtype=np.float32).reshape(2, 3, 4)
    wide[0, 0, 1] = np.nan
    wide[1, 2, 3] = np.inf
    out, note = to_uint8(wide)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out.max() <= 255
    assert out[0, 0, 1] == 0 and out[1, 2, 3] == 0 and "rescaled" in note
    assert out[1, 2, 2] == 255  # the largest finite value


def test_to_uint8_rescales_the_extremes_of_64_bit_types_without_overflow():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in the arithmetic would be a RuntimeWarning
        extreme = np.array([[[-1.7e308, 0.0, 1.7e308, np.nan]]])
        assert to_uint8(extreme)[0].ravel().tolist() == [0, 128, 255, 0]
        big = np.array([[[np.iinfo(np.int64).min, 0, np.iinfo(np.int64).max]]])
        assert to_uint8(big)[0].ravel().tolist() == [0, 128, 255]
        flat = np.full((1, 2, 2), 1000.0)
        assert not to_uint8(flat)[0].any()


def test_corrupt_file_is_an_input_error(tmp_path):
    path = write_image(tmp_path / "c.mha", np.zeros((4, 20, 20), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="c.mha"):
        read_stack(path)


def test_write_outputs_contract(tmp_path):
    array = np.zeros((12, 20, 30), dtype=np.uint8)
    stack = read_stack(write_image(tmp_path / "s.mha", array, spacing=(0.28, 0.28, 1.0)))
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:10, 5:15] = 1
    out = tmp_path / "out"
    write_outputs(out, stack, 7, mask)
    image = sitk.ReadImage(str(out / OUTPUT_MASK))
    written = sitk.GetArrayFromImage(image)
    assert written.shape == (12, 20, 30) and written.dtype == np.uint8
    assert image.GetSpacing() == pytest.approx(stack.spacing)
    assert np.array_equal(np.flatnonzero(written.reshape(12, -1).any(axis=1)), [7])
    assert written[7].sum() == mask.sum()
    assert json.loads((out / OUTPUT_FRAME).read_text()) == 7
    assert not list(out.rglob("*.partial*"))


def test_minus_one_writes_an_empty_mask(tmp_path):
    stack = read_stack(write_image(tmp_path / "s.mha", np.ones((6, 8, 10), dtype=np.uint8)))
    write_outputs(tmp_path / "out", stack, -1, None)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / OUTPUT_MASK))).sum() == 0
    assert json.loads((tmp_path / "out" / OUTPUT_FRAME).read_text()) == -1


def test_failure_leaves_nothing_behind(tmp_path):
    stack = read_stack(write_image(tmp_path / "s.mha", np.ones((6, 8, 10), dtype=np.uint8)))

    def explode(path):
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space"):
        write_outputs(tmp_path / "out", stack, 2, np.ones((8, 10), np.uint8), {OUTPUT_FRAME.with_name("x.txt"): explode})
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_transaction_abort_removes_staged(tmp_path):
    transaction = OutputTransaction(tmp_path)
    transaction.stage_json(OUTPUT_FRAME, 3)
    assert list(tmp_path.glob(".*partial*"))
    transaction.abort()
    assert not list(tmp_path.rglob("*.json"))


# ---------------------------------------------------------------------------- our MetaImage reading and writing

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.uint64, np.float32, np.float64])
@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("vector", [False, True])
def test_metaimage_pixels_decode_as_simpleitk_reads_them(tmp_path, dtype, compressed, vector):
    from algorithm import metaimage

    rng = np.random.default_rng(0)
    shape = (5, 7, 9, 3) if vector else (5, 7, 9)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    array = (rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True) if info is not None
             else rng.normal(0, 1e3, shape).astype(dtype))
    path = tmp_path / "x.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path), useCompression=compressed)
    header = metaimage.read_header(path)
    decoded = np.concatenate([block for _, block in metaimage.frame_blocks(header)])
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert decoded.dtype == expected.dtype and np.array_equal(decoded, expected)


def test_big_endian_metaimage(tmp_path):
    from algorithm import metaimage

    array = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 300).astype(">i2")
    path = tmp_path / "be.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_SHORT\n"
                     b"BinaryDataByteOrderMSB = True\nElementDataFile = LOCAL\n" + array.tobytes())
    decoded = np.concatenate([block for _, block in metaimage.frame_blocks(metaimage.read_header(path))])
    assert np.array_equal(decoded, array.astype(np.int16))
    assert np.array_equal(decoded, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def test_header_parse_follows_metaio(tmp_path):
    """':' separates like '=', names are case-sensitive (an unknown name is skipped), the header ends at
    ElementDataFile, and a key given twice is refused."""
    from algorithm import metaimage

    path = tmp_path / "h.mha"
    pixels = bytes(range(24))
    path.write_bytes(b"ObjectType: Image\nNDims = 3\nelementdatafile = /etc/passwd\nDimSize = 4 3 2\n"
                     b"ElementType := MET_UCHAR\nElementDataFile = LOCAL\n" + pixels)
    header = metaimage.read_header(path)
    assert header.size == (4, 3, 2) and header.data_file == path and header.data_offset == len(path.read_bytes()) - 24
    path.write_bytes(b"NDims = 3\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    with pytest.raises(metaimage.MetaImageError, match="twice"):
        metaimage.read_header(path)


def test_streamed_mask_reads_back_as_simpleitk_would_write_it(tmp_path):
    from algorithm.contract import Stack, mask_stack_image, write_mask

    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    stack = Stack(array=np.zeros((7, 20, 30), np.uint8), spacing=(0.28, 0.3, 1.5), origin=(-3.0, 4.5, 10.0),
                  direction=direction, path=tmp_path / "in.mha")
    mask = np.zeros((20, 30), np.uint8)
    mask[4:12, 5:25] = 1
    for frame, frame_mask in ((3, mask), (-1, None)):
        write_mask(tmp_path / "ours.mha", stack, frame, frame_mask)
        ours = sitk.ReadImage(str(tmp_path / "ours.mha"))
        reference = mask_stack_image(stack, frame, frame_mask)
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
        assert ours.GetSpacing() == pytest.approx(stack.spacing) and ours.GetOrigin() == pytest.approx(stack.origin)
        assert ours.GetDirection() == pytest.approx(direction) and ours.GetPixelID() == sitk.sitkUInt8


def test_stale_outputs_of_ours_are_removed_on_commit_only(tmp_path):
    stack = read_stack(write_image(tmp_path / "s.mha", np.ones((6, 8, 10), dtype=np.uint8)))
    out = tmp_path / "out"
    write_outputs(out, stack, 2, np.ones((8, 10), np.uint8),
                  {Path("fetalclipseg") / "result.json": lambda p: p.write_text("{}")})

    def explode(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError):
        write_outputs(out, stack, 1, None, {Path("fetalclipseg") / "chosen_frame.png": explode})
    assert (out / "fetalclipseg" / "result.json").is_file()  # a failed run changes nothing
    assert json.loads((out / OUTPUT_FRAME).read_text()) == 2
    write_outputs(out, stack, 1, None)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        sorted([str(OUTPUT_FRAME), str(OUTPUT_MASK)])
