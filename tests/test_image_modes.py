"""Every PIL mode Pillow opens from a file becomes the right 8-bit RGB (was: a 16-bit PNG came out all white), in
`predict`'s preprocessing and in folder datasets; symbolic links in folder datasets (a folder link back out of its
class folder, dangling and looping file links) fail in one line or are skipped, never mislabel images."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from isoconv.data import load_dataset
from isoconv.data.images import BadImageError, decode_image_array
from isoconv.errors import UserError
from isoconv.interop.preprocess import Preprocess

RNG = np.random.RandomState(0)
RGB = RNG.randint(0, 256, (7, 7, 3)).astype(np.uint8)
GRAY = RNG.randint(0, 256, (7, 7)).astype(np.uint8)
PALETTE = RNG.randint(0, 256, (256, 3)).astype(np.uint8)
INDEX = RNG.randint(0, 256, (7, 7)).astype(np.uint8)
ALPHA = RNG.randint(0, 256, (7, 7)).astype(np.uint8)


def gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def palette_image() -> Image.Image:
    im = Image.fromarray(INDEX, "L")
    im.putpalette(PALETTE.tobytes())  # an L image with a palette is a P image
    return im.convert("P") if im.mode != "P" else im


def ycbcr() -> Image.Image:
    """RGB in JFIF YCbCr, computed here (not by Pillow)."""
    r, g, b = (RGB[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return Image.fromarray(np.clip(np.rint(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8), "YCbCr")


def lab() -> Image.Image:
    srgb_to_lab = ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("sRGB"),
                                                          ImageCms.createProfile("LAB"), "RGB", "LAB")
    return ImageCms.applyTransform(Image.fromarray(RGB, "RGB"), srgb_to_lab)


def pa() -> Image.Image:
    im = palette_image().convert("PA")
    im.putalpha(Image.fromarray(ALPHA, "L"))
    return im


# mode -> (file format it opens from in that mode, the image, the RGB it must become, tolerance)
CASES = {
    "1": ("png", lambda: Image.fromarray(GRAY > 127), gray3((GRAY > 127).astype(np.uint8) * 255), 0),
    "L": ("png", lambda: Image.fromarray(GRAY, "L"), gray3(GRAY), 0),
    "LA": ("png", lambda: Image.fromarray(np.stack([GRAY, ALPHA], -1), "LA"), gray3(GRAY), 0),  # alpha dropped
    "P": ("png", palette_image, PALETTE[INDEX], 0),
    "PA": ("tiff", pa, PALETTE[INDEX], 0),
    "RGB": ("png", lambda: Image.fromarray(RGB, "RGB"), RGB, 0),
    "RGBA": ("png", lambda: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA"), RGB, 0),
    "CMYK": ("tiff", lambda: Image.fromarray(np.dstack([255 - RGB, np.zeros_like(GRAY)]), "CMYK"), RGB, 0),
    "YCbCr": ("tiff", ycbcr, RGB, 2),  # 8-bit YCbCr rounds each channel: a step or two back in RGB
    "LAB": ("tiff", lab, RGB, 16),  # 8-bit L*a*b* is coarser than sRGB in dark saturated colours
    "I;16": ("png", lambda: Image.fromarray(GRAY.astype(np.uint16) * 257), gray3(GRAY), 0),
    "I;16B": ("tiff", lambda: Image.frombytes("I;16B", GRAY.shape[::-1], (GRAY.astype(">u2") * 257).tobytes()),
              gray3(GRAY), 0),
    "I": ("tiff", lambda: Image.fromarray(GRAY.astype(np.int32) * 257, "I"), gray3(GRAY), 0),
    "F": ("tiff", lambda: Image.fromarray(GRAY.astype(np.float32) / 255, "F"), gray3(GRAY), 0),
}
MODES = list(CASES)


def write(mode: str, path: Path) -> np.ndarray:
    fmt, make, want, _ = CASES[mode]
    make().save(path, fmt)
    with Image.open(path) as im:
        assert im.mode == mode, f"{path} opens as {im.mode}, not {mode}"
    return want


def close(got: np.ndarray, want: np.ndarray, tol: int) -> bool:
    return got.shape == want.shape and int(np.abs(got.astype(int) - want.astype(int)).max()) <= tol


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_to_the_reference_rgb(mode, tmp_path):
    path = tmp_path / f"image.{CASES[mode][0]}"
    want = write(mode, path)
    assert close(decode_image_array(path), want, CASES[mode][3])


@pytest.mark.parametrize("mode", MODES)
def test_predict_preprocessing_of_files_and_pil_images_agrees_with_the_reference(mode, tmp_path):
    path = tmp_path / f"image.{CASES[mode][0]}"
    want = write(mode, path)
    pre = Preprocess(image_size=5, mean=(0.0,) * 3, std=(1.0,) * 3, classes=("a",))
    want_chw = torch.from_numpy(want).permute(2, 0, 1)
    with Image.open(path) as im:
        from_pil = pre.to_uint8(im)[0]
    for got in (pre.to_uint8(path)[0], from_pil):
        # 7x7 resized to 5x5: compare with the reference resized the same way
        resized = torch.from_numpy(np.array(Image.fromarray(want).resize((5, 5), Image.BICUBIC))).permute(2, 0, 1)
        assert close(got.numpy(), resized.numpy(), CASES[mode][3]), mode
    assert want_chw.shape == (3, 7, 7)


@pytest.mark.parametrize("scale, values", [(255, GRAY.astype(np.float32) / 255),
                                           (1, GRAY.astype(np.float32))])
def test_float_images_are_read_as_0_to_1_or_as_0_to_255(scale, values, tmp_path):
    Image.fromarray(values, "F").save(tmp_path / "f.tiff")
    assert np.array_equal(decode_image_array(tmp_path / "f.tiff"), gray3(GRAY))


def test_sixteen_bit_pgm_opens_as_I_and_scales(tmp_path):
    """A 16-bit PGM (maxval 65535) is what Pillow opens as mode I."""
    Image.fromarray(GRAY.astype(np.uint16) * 257).save(tmp_path / "g.pgm")
    with Image.open(tmp_path / "g.pgm") as im:
        assert im.mode == "I"
    assert np.array_equal(decode_image_array(tmp_path / "g.pgm"), gray3(GRAY))


def folder_tree(root: Path, per_class: int = 2) -> None:
    """train/{a,b}/ and val/{a,b}/ of 7x7 PNGs; class a dark (0-9), class b bright (200-209)."""
    for split in ("train", "val"):
        for label, base in (("a", 0), ("b", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((7, 7, 3), base + i, np.uint8)).save(root / split / label / f"{i}.png")


def test_a_folder_dataset_of_every_mode_reads_each_image_as_its_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("ISOCONV_CACHE", raising=False)
    folder_tree(tmp_path)
    wants = {}
    for mode in MODES:
        fmt = CASES[mode][0]
        wants[f"train/a/m-{mode}.{fmt}"] = write(mode, tmp_path / "train" / "a" / f"m-{mode}.{fmt}")
    ds = load_dataset("folder", tmp_path, "train")
    assert len(ds) == 4 + len(wants)
    class_a = [im.permute(1, 2, 0).numpy() for im, label in zip(ds.images, ds.labels) if label == 0]
    for name, want in wants.items():  # each mode's image is in class a as its reference (the order is the loader's)
        mode = name.split("m-")[1].rsplit(".", 1)[0]
        assert any(close(got, want, CASES[mode][3]) for got in class_a), name


# ---- symbolic links in folder datasets

def test_a_folder_link_back_out_of_its_class_is_refused_in_one_line(tmp_path):
    """Was: train/a/loopdir -> .. put class b's images into class a."""
    folder_tree(tmp_path)
    os.symlink("..", tmp_path / "train" / "a" / "loopdir")
    with pytest.raises(UserError) as e:
        load_dataset("folder", tmp_path, "train")
    assert str(e.value) == (f"{tmp_path}/train/a/loopdir is a link to {tmp_path / 'train'}, out of its class folder "
                            f"{tmp_path}/train/a into the dataset's own folders (their images would be labelled a "
                            f"too); remove the link")


@pytest.mark.parametrize("target", ["../b", "../../val/a", "/"])
def test_folder_links_to_another_class_or_above_the_dataset_are_refused(tmp_path, target):
    folder_tree(tmp_path)
    os.symlink(target, tmp_path / "train" / "a" / "link")
    with pytest.raises(UserError, match="is a link to .* out of its class folder .* remove the link"):
        load_dataset("folder", tmp_path, "train")


def test_folder_links_inside_the_class_or_to_other_disks_are_followed(tmp_path, monkeypatch):
    monkeypatch.delenv("ISOCONV_CACHE", raising=False)
    folder_tree(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.full((7, 7, 3), 5, np.uint8)).save(elsewhere / "x.png")
    (tmp_path / "data" / "train" / "a" / "sub").mkdir()
    Image.fromarray(np.full((7, 7, 3), 6, np.uint8)).save(tmp_path / "data" / "train" / "a" / "sub" / "y.png")
    os.symlink("sub", tmp_path / "data" / "train" / "a" / "again")  # inside: its images once, not twice
    os.symlink(elsewhere, tmp_path / "data" / "train" / "a" / "more")
    ds = load_dataset("folder", tmp_path / "data", "train")
    assert torch.bincount(ds.labels).tolist() == [4, 2]
    assert sorted(int(im[0, 0, 0]) for im, label in zip(ds.images, ds.labels) if label == 0) == [0, 1, 5, 6]


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_file_link_says_what_it_is_and_is_skipped_with_skip_bad_images(tmp_path, monkeypatch, kind):
    """Was: "disappeared while the dataset was being read; run again", and --skip-bad-images did not skip it."""
    monkeypatch.delenv("ISOCONV_CACHE", raising=False)
    folder_tree(tmp_path)
    link = tmp_path / "train" / "b" / "broken.png"
    os.symlink("nowhere.png" if kind == "dangling" else "broken.png", link)
    reason = ("it is a symbolic link to nowhere.png, which does not exist" if kind == "dangling"
              else "it is a symbolic link in a loop (to broken.png)")
    with pytest.raises(BadImageError) as e:
        load_dataset("folder", tmp_path, "train")
    assert str(e.value) == f"cannot read image {link}: {reason}; fix or remove the file (or pass --skip-bad-images)"
    ds = load_dataset("folder", tmp_path, "train", skip_bad_images=True)
    assert ds.skipped == ("train/b/broken.png",) and torch.bincount(ds.labels).tolist() == [2, 2]


def test_predict_names_a_dangling_link(tmp_path):
    os.symlink("nowhere.png", tmp_path / "x.png")
    with pytest.raises(BadImageError, match=r"x.png: it is a symbolic link to nowhere.png, which does not exist"):
        decode_image_array(tmp_path / "x.png")
