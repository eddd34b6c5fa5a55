"""The ray caster: shapes, colours, masks, shadows, byte-exact batch independence, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from iclevr_diffusion.data.render import (
    COLOR_RGB,
    SceneObject,
    in_frame,
    parse_size,
    render_scene,
    render_scenes,
)
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import COLORS, SHAPES


def obj(shape="sphere", color="red", **kw) -> SceneObject:
    return SceneObject(shape, color, **kw)


def test_image_shape_and_type():
    img = render_scene([obj()], 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    wide = render_scene([obj()], "40x30")
    assert wide.shape == (30, 40, 3)


def test_empty_scene_is_a_gray_floor():
    img = render_scene([], 24).astype(int)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    assert 90 < img.mean() < 200


def test_dicts_and_dataclasses_render_the_same():
    spec = {"shape": "cube", "color": "blue", "material": "metal", "size": "small", "x": 1.0, "y": -0.5,
            "rotation": 30.0}
    assert np.array_equal(render_scene([spec], 24), render_scene([SceneObject(**spec)], 24))


def test_batch_independent_bytes():
    """An image is the same bytes alone, in a batch with other scenes, or split over chunks."""
    scenes = [
        [obj("cube", "red", x=-1.5, rotation=20), obj("cylinder", "cyan", x=1.0, y=1.0)],
        [obj("sphere", "yellow", material="metal", y=-1.0)],
        [obj("cylinder", "green", size="small", x=2.0), obj("cube", "gray", x=-0.5, y=2.0),
         obj("sphere", "purple", x=0.5, y=-1.5)],
    ]
    together = render_scenes(scenes, 24)
    chunked = render_scenes(scenes, 24, max_samples=24 * 24 * 4)  # one scene per chunk
    for i, scene in enumerate(scenes):
        alone = render_scene(scene, 24)
        assert np.array_equal(together.images[i], alone)
        assert np.array_equal(chunked.images[i], alone)


def test_masks_cover_the_object_and_occlusion_is_measured():
    front = obj("cube", "blue", y=-1.0)
    back = obj("cylinder", "red", y=0.6)  # straight behind, partly hidden
    img, masks = render_scene([back, front], 48, masks=True)
    assert masks.shape == (2, 48, 48)
    assert masks[1].sum() > 20 and masks[0].sum() > 5
    result = render_scenes([[back, front]], 48)
    frac = result.visible_fraction[0]
    assert frac[1] == 1.0 and frac[0] < 0.95  # the back one is partly hidden
    # Where a mask is full, the pixel shows that object's colour.
    px = img[masks[1] == 1.0].mean(0)
    assert px[2] > px[0] + 40


@pytest.mark.parametrize("shape", SHAPES)
def test_colours_are_recognisable(shape):
    """The mean colour of each object's fully covered pixels is nearest its own CLEVR colour
    (compared as chromaticity, as lighting scales brightness)."""
    scenes = [[obj(shape, c, x=0.0, y=0.0)] for c in COLORS]
    result = render_scenes(scenes, 32, masks=True)

    def chroma(rgb):
        rgb = np.asarray(rgb, dtype=float) + 1.0
        return rgb / rgb.sum()

    for c, img, mask in zip(COLORS, result.images, result.masks, strict=True):
        mean = img[mask[0] == 1.0].mean(0)
        nearest = min(COLORS, key=lambda k: np.abs(chroma(COLOR_RGB[k]) - chroma(mean)).sum())
        assert nearest == c, (shape, c, mean)


def test_shapes_have_different_silhouettes():
    masks = [render_scene([obj(s, "gray", rotation=30)], 48, masks=True)[1][0] > 0.5 for s in SHAPES]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (masks[i] != masks[j]).sum() >= 10


def test_objects_cast_shadows_on_the_floor():
    empty = render_scene([], 48).astype(int)
    img, masks = render_scene([obj("cylinder", "yellow")], 48, masks=True)
    floor = masks[0] == 0
    darker = (empty.sum(2) - img.astype(int).sum(2))[floor]
    assert (darker > 30).sum() >= 10  # a shadow, not just anti-aliasing
    assert (darker < -3).sum() == 0  # an object never brightens the floor


def test_in_frame():
    assert in_frame(obj(x=0, y=0))
    assert not in_frame(obj(x=9, y=0))
    assert not in_frame(obj(x=0, y=-8))


def test_parse_size():
    assert parse_size(64) == (64, 64)
    assert parse_size("64") == (64, 64)
    assert parse_size(" 320x240 ") == (320, 240)
    assert parse_size((80, 60)) == (80, 60)


@pytest.mark.parametrize("bad", ["abc", "64x", "x64", "0", "4", "64x48x2", "1e3", 0, 100000, True, 6.4])
def test_bad_sizes_fail_clearly(bad):
    with pytest.raises(IclevrError, match="size"):
        parse_size(bad)


def test_bad_objects_fail_clearly():
    with pytest.raises(IclevrError, match="shape 'cone'"):
        SceneObject("cone", "red")
    with pytest.raises(IclevrError, match="color 'pink'"):
        render_scene([{"shape": "cube", "color": "pink"}], 16)
    with pytest.raises(IclevrError, match="Bad object"):
        render_scene([{"shape": "cube", "color": "red", "weight": 3}], 16)
    with pytest.raises(IclevrError, match="supersample"):
        render_scene([obj()], 16, supersample=0)
    with pytest.raises(IclevrError, match="no scenes"):
        render_scenes([], 16)
