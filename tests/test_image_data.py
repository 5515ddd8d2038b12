"""Image data sources of the image family: folders and manifests, channels and size, the
per-image profile, and bad files (each refused with a DataError naming it, before training)."""

from __future__ import annotations

import pandas as pd
import pytest
from image_support import DIGITS, bad_files, copy_digits, pipeline_cfg, png_bytes

from pipelines.data import DataError, load_data, split_data
from pipelines.families import load_family


def _family(data, **kw):
    cfg = pipeline_cfg(data, **kw)
    return cfg, load_family(cfg)


def test_image_folder_rows_profile_and_inputs(tmp_path):
    folder = copy_digits(tmp_path / "train", classes=(0, 1, 7), per_class=5)
    (folder / "7" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    cfg, fam = _family(folder)
    raw = load_data(cfg.data, fam)
    rows = raw.frames["path"]
    assert list(rows.columns) == ["path", "label"]
    assert sorted(set(rows.label)) == [0, 1, 7]  # digit folder names become integers
    assert len(rows) == 15
    profile = fam.profile(rows)
    assert list(profile.columns) == ["readable", "format", "channels", "width", "height",
                                     "mean_intensity", "std_intensity", "label"]
    assert profile.readable.all() and set(profile.format) == {"PNG"}
    assert set(profile.channels) == {1} and set(profile.width) == {8}
    assert profile.mean_intensity.between(1, 254).all()
    assert fam.input_shape() == (1, 8)  # detected: grayscale, the images' side
    arrays = fam.inputs(rows.iloc[:3])
    assert [a.shape for a in arrays] == [(1, 8, 8)] * 3
    assert all(0.0 <= a.min() and a.max() <= 1.0 for a in arrays)
    # the fingerprint follows the bytes of the images
    before = raw.fingerprint
    first = sorted((folder / "0").iterdir())[0]
    first.write_bytes(png_bytes(value=3))
    assert load_data(cfg.data, load_family(cfg)).fingerprint != before


def test_manifest_rgb_string_labels_relative_paths(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i, (fmt, ext) in enumerate([("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"),
                                    ("WEBP", "webp")] * 3):
        (imgs / f"{i}.{ext}").write_bytes(png_bytes((20, 12), "RGB", fmt, value=20 * i))
        rows.append({"file": f"imgs/{i}.{ext}", "kind": ["cat", "dog"][i % 2]})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    cfg, fam = _family(manifest, data_fields={"label_column": "kind"},
                       data_options={"path_column": "file", "image_size": 16})
    raw = load_data(cfg.data, fam)
    got = raw.frames["path"]
    assert sorted(set(got.label)) == ["cat", "dog"]
    assert fam.input_shape() == (3, 16)  # colour detected; the size as configured
    assert fam.inputs(got.iloc[:1])[0].shape == (3, 16, 16)
    assert set(fam.profile(got).format) == {"PNG", "JPEG", "BMP", "WEBP"}
    # channels: 1 forces grayscale inputs
    _, gray = _family(manifest, data_fields={"label_column": "kind"},
                      data_options={"path_column": "file", "channels": 1})
    load_data(gray.cfg.data, gray)
    assert gray.input_shape() == (1, 20)
    # a manifest row whose file does not exist names the line and the file
    pd.DataFrame(rows + [{"file": "imgs/missing.png", "kind": "cat"}]).to_csv(manifest,
                                                                              index=False)
    with pytest.raises(DataError, match=r"line 14: image file not found: .*missing\.png"):
        load_data(cfg.data, load_family(cfg))


def test_digits_split_and_drift_profile(tmp_path):
    cfg, fam = _family(DIGITS / "train", test=DIGITS / "test")
    data = split_data(load_data(cfg.data, fam), cfg.data)
    assert (len(data.train), len(data.validation), len(data.test)) == (1149, 288, 360)
    assert data.id2label == {i: str(i) for i in range(10)}
    drift = fam.drift_profile(data.train, data.names(data.train)).to_dict()
    assert drift["rows"] == 1149 and sum(drift["labels"].values()) == 1149
    assert sum(drift["lengths"].values()) == 1149 and drift["vocab"] == {}


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_image_file_is_named(tmp_path, name):
    folder = copy_digits(tmp_path / "train", classes=(0, 1), per_class=3)
    (folder / "1" / name).write_bytes(bad_files()[name])
    cfg, fam = _family(folder, data_options={"max_pixels": 1_000_000})
    with pytest.raises(DataError) as err:
        load_data(cfg.data, fam)
    msg = str(err.value)
    assert f"1/{name}" in msg and "1 of 7 image files cannot be used" in msg
    reason = {"truncated.png": "truncated", "garbage.png": "not a PNG, JPEG, BMP or WebP",
              "text.png": "not a PNG", "empty.png": "not a PNG", "gif.png": "not a PNG",
              "bomb.png": "over max_pixels=1000000"}[name]
    assert reason in msg


@pytest.mark.parametrize("case, match", [
    ("stray", r"notes\.txt is not an image file"),
    ("empty_class", r"class folder .*/2 has no images"),
    ("loose_file", r"files outside the class folders: x\.png"),
    ("no_classes", r"has no class folders"),
])
def test_bad_folder_layout_is_named(tmp_path, case, match):
    folder = copy_digits(tmp_path / "train", classes=(0, 1), per_class=2)
    if case == "stray":
        (folder / "1" / "notes.txt").write_text("x")
    elif case == "empty_class":
        (folder / "2").mkdir()
    elif case == "loose_file":
        (folder / "x.png").write_bytes(png_bytes())
    else:
        folder = tmp_path / "flat"
        folder.mkdir()
    cfg, fam = _family(folder)
    with pytest.raises(DataError, match=match):
        load_data(cfg.data, fam)


def test_truncated_images_stay_refused():
    """The decoder refuses to work if someone switched Pillow's truncated-image loading on."""
    from PIL import ImageFile

    from bentos.image_classifier import maas_images

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
            maas_images.decode(png_bytes(), "x")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    decoded = maas_images.decode(png_bytes((5, 4)), "x")
    assert (decoded.width, decoded.height, decoded.channels, decoded.format) == (5, 4, 1, "PNG")


def test_maas_run_stops_on_a_corrupt_png_with_exit_3(tmp_path, monkeypatch):
    """A truncated PNG in the training folder: exit 3 naming the file, before any store is
    written (nothing trained, nothing registered)."""
    import yaml
    from click.testing import CliRunner

    from pipelines.cli import main

    folder = copy_digits(tmp_path / "train", classes=(0, 1), per_class=4)
    bad = sorted((folder / "1").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives, the pixel data does not
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "bad", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "data": {"path": str(folder)}, "model": {"family": "image_classifier"},
        "validation": {"suite": str(DIGITS.parents[1] / "pipelines" / "digits-suite.json")},
        "tuning": {"search_space": {"learning_rate": {"type": "float", "low": 1e-3,
                                                      "high": 2e-3}}},
        "registry": {"model_name": "bad"}}), "utf-8")
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["run", str(pipeline)])
    assert out.exit_code == 3, out.output
    assert f"{bad}: corrupt or truncated PNG image" in out.output
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("rows, epochs, batch", [(1437, 12, 32), (60000, 2, 64)])
def test_init_settings_make_a_valid_pipeline(tmp_path, rows, epochs, batch):
    """The image part `maas init` writes loads as a pipeline of this family, sized by rows."""
    import yaml

    from pipelines.config import PipelineConfig
    from pipelines.families.image_classifier import init_settings
    from pipelines.init_detect import Detection

    found = Detection("image_classifier", DIGITS / "train", "image_folder", rows,
                      tuple(str(i) for i in range(10)), channels=1, image_size=28)
    lines = init_settings(found, DIGITS / "test", tmp_path)
    raw = yaml.safe_load("\n".join(lines))
    raw.update(name="x", registry={"model_name": "x"})
    cfg = PipelineConfig.from_dict(raw, base_dir=tmp_path)
    assert cfg.model.family == "image_classifier"
    assert cfg.data.path == (DIGITS / "train").resolve()
    assert cfg.data.options == {"channels": 1, "image_size": 28}
    assert (cfg.tuning.max_epochs, cfg.tuning.fixed["batch_size"]) == (epochs, batch)
