"""The image-folder index: classes, extensions, skipped files, the shared class map, errors."""

import numpy as np
import pytest
from PIL import Image

from rectrain.data.index import IMAGE_EXTENSIONS, build_index
from rectrain.errors import UserError


def _img(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


@pytest.fixture
def data(tmp_path):
    for cls in ("zebra", "ant", "moth"):
        _img(tmp_path / "train" / cls / "a.jpg")
        _img(tmp_path / "train" / cls / "b.png")
    _img(tmp_path / "val" / "moth" / "v.jpg")
    return tmp_path


def test_classes_are_sorted_folder_names(data):
    assert build_index(str(data), "train").classes == ["ant", "moth", "zebra"]


def test_paths_are_relative_and_sorted_with_matching_labels(data):
    ix = build_index(str(data), "train")
    assert ix.paths.tolist() == sorted(ix.paths.tolist())
    assert ix.paths[0] == "ant/a.jpg"
    assert [ix.classes[l] for l in ix.labels] == [p.split("/")[0] for p in ix.paths.tolist()]
    assert ix.abspath(0) == str(data / "train" / "ant" / "a.jpg")


def test_samples_live_in_numpy_arrays_with_int64_labels(data):
    ix = build_index(str(data), "train")
    assert isinstance(ix.paths, np.ndarray) and ix.paths.dtype.kind == "U"
    assert ix.labels.dtype == np.int64 and len(ix) == 6


def test_extensions_match_in_any_letter_case(tmp_path):
    for name in ("a.JPG", "b.Jpeg", "c.PNG", "d.webp", "e.TIFF"):
        (tmp_path / "train" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "c" / name).write_bytes(b"x")
    assert len(build_index(str(tmp_path), "train")) == 5
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_hidden_and_non_image_files_are_skipped_and_counted(data):
    (data / "train" / "ant" / ".DS_Store").write_bytes(b"x")
    (data / "train" / "ant" / "._a.jpg").write_bytes(b"x")
    (data / "train" / "ant" / "notes.txt").write_text("hi")
    (data / "train" / "ant" / "labels.csv").write_text("hi")
    (data / "train" / ".hidden_class").mkdir()
    ix = build_index(str(data), "train")
    assert len(ix) == 6
    assert ix.skipped == {"hidden": 3, "not_image": 2}


def test_images_in_subfolders_of_a_class_belong_to_it(data):
    _img(data / "train" / "ant" / "sub" / "c.jpg")
    ix = build_index(str(data), "train")
    assert "ant/sub/c.jpg" in ix.paths.tolist()
    assert ix.classes[ix.labels[ix.paths.tolist().index("ant/sub/c.jpg")]] == "ant"


def test_symlink_loop_inside_a_class_is_skipped_not_followed(data):
    (data / "train" / "ant" / "loop").symlink_to(data / "train" / "ant", target_is_directory=True)
    ix = build_index(str(data), "train")
    assert len(ix) == 6 and ix.skipped == {"symlink_loop": 1}


def test_val_uses_train_class_map(data):
    train = build_index(str(data), "train")
    val = build_index(str(data), "val", classes=train.classes)
    assert val.classes == train.classes
    assert val.labels.tolist() == [train.classes.index("moth")]


def test_val_class_unknown_to_train_is_an_error_naming_it(data):
    _img(data / "val" / "unicorn" / "u.jpg")
    with pytest.raises(UserError, match="unicorn"):
        build_index(str(data), "val", classes=build_index(str(data), "train").classes)


def test_subset_keeps_class_map_and_selects_samples(data):
    ix = build_index(str(data), "train")
    sub = ix.subset(ix.labels == 1)
    assert sub.classes == ix.classes and len(sub) == 2 and set(sub.labels.tolist()) == {1}
    assert len(ix.subset(np.array([0, 5]))) == 2


@pytest.mark.parametrize("make, where", [
    (lambda d: None, "does not exist"),  # data_dir itself missing
    (lambda d: d.mkdir(), "train"),  # no split folder
    (lambda d: (d / "train").mkdir(parents=True), "no class folders"),
    (lambda d: (d / "train" / "c").mkdir(parents=True), "no image files"),
])
def test_unusable_layouts_are_user_errors_naming_path_and_layout(tmp_path, make, where):
    d = tmp_path / "data"
    make(d)
    with pytest.raises(UserError, match=where) as e:
        build_index(str(d), "train")
    assert str(d) in str(e.value) and "DATA_DIR/{train,val}/<class>/<images>" in str(e.value)
