import hashlib
import json

import pytest
import torch

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import (
    LABELS,
    NUM_CLASSES,
    from_multi_hot,
    multi_hot_batch,
    packaged_file,
    parse_labels,
    to_multi_hot,
)


def test_24_classes_in_objects_json_order():
    assert NUM_CLASSES == 24
    assert LABELS[0] == "gray cube" and LABELS[9] == "red sphere" and LABELS[23] == "yellow cylinder"


def test_parse_forgives_case_and_spaces():
    assert parse_labels("  Red   SPHERE ,cyan cube") == ["red sphere", "cyan cube"]
    assert parse_labels(["Gray Cube"]) == ["gray cube"]


def test_multi_hot_round_trip():
    vec = to_multi_hot(["red sphere", "cyan cube"])
    assert sum(vec) == 2 and vec[9] == 1 and vec[6] == 1
    assert from_multi_hot(vec) == ["cyan cube", "red sphere"]
    batch = multi_hot_batch([["gray cube"], ["yellow cylinder", "red cube"]])
    assert batch.shape == (2, 24) and batch.dtype == torch.float32
    assert batch[1].nonzero().flatten().tolist() == [1, 23]


def test_unknown_label_suggests_the_closest():
    with pytest.raises(IclevrError, match=r"Unknown label 'red cub'\. Did you mean 'red cube'\?"):
        parse_labels("red cub")


def test_unknown_label_without_close_match_points_to_the_list():
    with pytest.raises(IclevrError, match="iclevr-diff labels"):
        parse_labels("xyzzy")


@pytest.mark.parametrize("spec", ["", " , ", []])
def test_empty_label_list_fails(spec):
    with pytest.raises(IclevrError, match="Empty label list"):
        parse_labels(spec)


def test_duplicate_label_fails():
    with pytest.raises(IclevrError, match="'red cube' appears twice"):
        parse_labels("red cube, Red Cube")


def test_more_than_three_objects_warns():
    with pytest.warns(UserWarning, match="at most 3"):
        names = parse_labels("red cube,blue cube,green cube,gray cube")
    assert len(names) == 4


# SHA-256 of each course file's JSON (keys sorted, default separators), taken from the course's own
# objects.json / test.json / new_test.json: a packaged copy that drifts from them changes its digest.
COURSE_FILES = {
    "objects.json": "2693a3abeb12830c8efffc15ad2774a09b856c258abb774349a6a1335a1fe91c",
    "test.json": "5bd1c81070a84e2f550c4b4add0f0186ee75d46c54606879548e32a11cf894fd",
    "new_test.json": "d1ab2f4a98518a802c663f8e92751e9e6de6becff5dfd1a5ac375c6d2880aa15",
}


@pytest.mark.parametrize("name", list(COURSE_FILES))
def test_packaged_condition_files_are_the_course_files(name):
    content = json.loads(packaged_file(name).read_text())
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    assert digest == COURSE_FILES[name]
    if name == "objects.json":
        assert content == {label: i for i, label in enumerate(LABELS)}
    else:  # 32 label sets of 1-3 distinct known objects: 72 objects in test, 84 in new_test
        assert len(content) == 32 and sum(map(len, content)) == {"test.json": 72, "new_test.json": 84}[name]
        assert all(1 <= len(c) <= 3 and len(set(c)) == len(c) and set(c) <= set(LABELS) for c in content)
