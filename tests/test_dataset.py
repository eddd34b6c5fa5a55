import json

import pytest

from conftest import TINY_ENTRIES, write_dataset
from iclevr_diffusion.data.iclevr import ICLEVRDataset, load_conditions
from iclevr_diffusion.errors import IclevrError


def test_loads_the_real_layout(tiny_dataset):
    ds = ICLEVRDataset(tiny_dataset, image_size=32)
    assert len(ds) == len(TINY_ENTRIES)
    image, label = ds[ds.files.index("CLEVR_train_000000_1.png")]
    assert image.shape == (3, 32, 32)
    assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()
    assert label.tolist() == [1.0 if i in (1, 14) else 0.0 for i in range(24)]


def test_squash_keeps_the_whole_frame_and_crop_cuts_the_sides(tmp_path):
    """A 4:3 frame with a red bar along the left edge, a blue one along the right and a 30x30 white square
    in the middle: squash keeps both bars and makes the square narrower than tall (80 -> 16 wide, 60 -> 16
    high); center_crop cuts the bars away and keeps the square square."""
    from PIL import Image, ImageDraw

    root = write_dataset(tmp_path / "d", {"CLEVR_train_000000_0.png": ["red cube"]})
    img = Image.new("RGB", (80, 60), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 7, 59), fill=(255, 0, 0))
    draw.rectangle((72, 0, 79, 59), fill=(0, 0, 255))
    draw.rectangle((25, 15, 54, 44), fill=(255, 255, 255))
    img.save(root / "iclevr" / "CLEVR_train_000000_0.png")
    squash = ICLEVRDataset(root, image_size=16, resize="squash")[0][0]
    crop = ICLEVRDataset(root, image_size=16, resize="center_crop")[0][0]
    assert squash.shape == crop.shape == (3, 16, 16)
    r, g, b = squash
    assert (r[:, 0] - b[:, 0] > 1).all() and (b[:, -1] - r[:, -1] > 1).all()  # both edges kept
    r, g, b = crop
    assert not ((r - b).abs() > 0.5).any()  # no trace of either bar

    def white_extent(image):  # (columns, rows) holding a mostly white pixel
        white = (image > 0.5).all(dim=0)
        return int(white.any(dim=0).sum()), int(white.any(dim=1).sum())

    assert white_extent(squash) == (6, 8)  # 30 * 16/80 wide, 30 * 16/60 high
    width, height = white_extent(crop)  # resized to 21x16 (30 -> 7.9 px wide), then cropped
    assert height == 8 and width in (7, 8)


@pytest.mark.parametrize("where", ["images", "."])
def test_finds_images_in_other_places(tmp_path, where):
    root = write_dataset(tmp_path / "d", TINY_ENTRIES, images_dir=where)
    assert len(ICLEVRDataset(root, image_size=8)) == 6


def test_sibling_iclevr_folder_and_explicit_images(tmp_path):
    root = write_dataset(tmp_path / "d", TINY_ENTRIES)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "train.json").write_text((root / "train.json").read_text())
    (root / "iclevr").rename(tmp_path / "iclevr")
    assert ICLEVRDataset(meta, image_size=8).images_dir == tmp_path / "iclevr"
    assert ICLEVRDataset(meta, image_size=8, images=tmp_path / "iclevr").images_dir == tmp_path / "iclevr"


def test_converts_grayscale_and_rgba(tiny_dataset):
    from PIL import Image

    name = "CLEVR_train_000000_0.png"
    Image.open(tiny_dataset / "iclevr" / name).convert("LA").save(tiny_dataset / "iclevr" / name)
    ds = ICLEVRDataset(tiny_dataset, image_size=8)
    assert ds[ds.files.index(name)][0].shape == (3, 8, 8)


def test_missing_image_is_named(tiny_dataset):
    (tiny_dataset / "iclevr" / "CLEVR_train_000001_2.png").unlink()
    with pytest.raises(IclevrError, match=r"CLEVR_train_000001_2\.png listed in train\.json is missing"):
        ICLEVRDataset(tiny_dataset)


def test_unreadable_image_is_named(tiny_dataset):
    (tiny_dataset / "iclevr" / "CLEVR_train_000001_2.png").write_bytes(b"not a png")
    ds = ICLEVRDataset(tiny_dataset)
    with pytest.raises(IclevrError, match=r"Cannot read image .*CLEVR_train_000001_2\.png"):
        ds[ds.files.index("CLEVR_train_000001_2.png")]


def test_unknown_label_in_train_json(tiny_dataset):
    entries = dict(TINY_ENTRIES, **{"CLEVR_train_000000_0.png": ["red cub"]})
    (tiny_dataset / "train.json").write_text(json.dumps(entries))
    with pytest.raises(IclevrError, match="Unknown label 'red cub' in train.json entry 'CLEVR_train_000000_0.png'"):
        ICLEVRDataset(tiny_dataset)


@pytest.mark.parametrize(
    "content, match",
    [("", "is empty"), ("{bad json", "not valid JSON"), ("[]", "must map image file names"), ("{}", "must map")],
)
def test_bad_train_json(tiny_dataset, content, match):
    (tiny_dataset / "train.json").write_text(content)
    with pytest.raises(IclevrError, match=match):
        ICLEVRDataset(tiny_dataset)


def test_missing_train_json_and_folder(tmp_path):
    with pytest.raises(IclevrError, match="does not exist"):
        ICLEVRDataset(tmp_path / "nowhere")
    with pytest.raises(IclevrError, match="train.json not found"):
        ICLEVRDataset(tmp_path)


def test_objects_json_in_another_order_is_refused(tiny_dataset):
    (tiny_dataset / "objects.json").write_text(json.dumps({"red cube": 0, "gray cube": 1}))
    with pytest.raises(IclevrError, match="does not match the 24 i-CLEVR classes"):
        ICLEVRDataset(tiny_dataset)


def test_packaged_splits():
    test, new_test = load_conditions("test"), load_conditions("new_test")
    assert len(test) == len(new_test) == 32
    assert sum(map(len, test)) == 72 and sum(map(len, new_test)) == 84


def test_user_condition_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([["Red Sphere", "cyan cube"], "gray cube"]))
    assert load_conditions(file=path) == [["red sphere", "cyan cube"], ["gray cube"]]
    path.write_text(json.dumps([["red sphere", "red sphere"]]))
    with pytest.raises(IclevrError, match="appears twice in mine.json entry 0"):
        load_conditions(file=path)
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(IclevrError, match="non-empty JSON list"):
        load_conditions(file=path)


def test_unknown_split():
    with pytest.raises(IclevrError, match="Unknown split 'tests'"):
        load_conditions("tests")
