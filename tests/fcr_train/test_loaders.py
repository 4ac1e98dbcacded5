import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fcr_train.api import DataConfig
from fcr_train.data import ImageCaptionDataset, collate_skip_bad, load_image
from fcr_train.imagenet_classes import IMAGENET_CLASSES
from fcr_train.loaders import (
    artbench_records,
    build_dataset,
    coco_prompts,
    coco_records,
    flickr30k_prompts,
    flickr30k_records,
    imagenet_prompts,
    laion_records,
    webdataset_records,
)
from PIL import Image


def _img(path, size=(12, 8), mode="RGB", color=(200, 10, 10)):
    Image.new(mode, size, color if mode == "RGB" else 100).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return [_img(d / f"{i}.jpg") for i in range(3)]


def test_laion_parquet_and_csv(tmp_path, images):
    names = [p.name for p in images]
    pq.write_table(pa.table({"image_path": names, "caption": ["a", "b", None]}), tmp_path / "t.parquet")
    recs = laion_records(tmp_path / "t.parquet", images_dir=images[0].parent)
    assert [r.caption for r in recs] == ["a", "b", ""]
    assert recs[0].image == str(images[0])
    (tmp_path / "t.csv").write_text("file,TEXT\n" + "".join(f"imgs/{n},cap {n}\n" for n in names))
    recs = laion_records(tmp_path / "t.csv")
    assert recs[2].image == str(images[2]) and recs[2].caption == "cap 2.jpg"
    ds = build_dataset(DataConfig(kind="laion", path=str(tmp_path / "t.csv"), resolution=8), resolution=8)
    item = ds[0]
    assert item["pixels"].shape == (3, 8, 8) and item["pixels"].min() >= -1 and item["pixels"].max() <= 1


def test_laion_bad_tables(tmp_path):
    pq.write_table(pa.table({"url": ["https://x/y.jpg"], "caption": ["c"]}), tmp_path / "u.parquet")
    with pytest.raises(ValueError, match="URLs"):
        laion_records(tmp_path / "u.parquet")
    pq.write_table(pa.table({"foo": ["a.jpg"], "bar": ["c"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="image column"):
        laion_records(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no column 'nope'"):
        laion_records(tmp_path / "c.parquet", image_column="nope")
    with pytest.raises(FileNotFoundError, match="LAION table"):
        laion_records(tmp_path / "missing.parquet")


def test_webdataset_shards(tmp_path):
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        buf = io.BytesIO()
        Image.new("RGB", (9, 9), (0, 255, 0)).save(buf, format="PNG")
        add("000001.png", buf.getvalue())
        add("000001.txt", b"a green square")
        add("000002.jpg", buf.getvalue())  # wrong extension for the bytes: PIL still reads it
        add("000002.json", json.dumps({"caption": "from json"}).encode())
        add("000003.txt", b"caption without image")
    recs = webdataset_records(shard.parent)
    assert [r.caption for r in recs] == ["a green square", "from json"]
    ds = ImageCaptionDataset(recs, resolution=4)
    assert torch.allclose(ds[0]["pixels"][1], torch.ones(4, 4))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        webdataset_records(tmp_path / "nothing*.tar")


def test_artbench_class_folders(tmp_path):
    for style in ("baroque", "ukiyo_e"):
        (tmp_path / "train" / style).mkdir(parents=True)
        _img(tmp_path / "train" / style / "a.jpg")
    (tmp_path / "train" / "baroque" / "notes.txt").write_text("not an image")
    recs = artbench_records(tmp_path)
    assert [r.caption for r in recs] == ["a painting in the style of baroque", "a painting in the style of ukiyo-e"]
    with pytest.raises(FileNotFoundError, match="class folders"):
        artbench_records(tmp_path / "train" / "baroque")


def test_coco_captions(tmp_path, images):
    ann = {"images": [{"id": 1, "file_name": "0.jpg"}, {"id": 2, "file_name": "1.jpg"}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "a red box "}, {"id": 11, "image_id": 1, "caption": "red"},
                           {"id": 12, "image_id": 2, "caption": "box"}, {"id": 13, "image_id": 99, "caption": "orphan"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    recs = coco_records(tmp_path / "captions_val2017.json", images[0].parent)
    assert len(recs) == 3 and recs[0].image == str(images[0])
    prompts = coco_prompts(tmp_path / "captions_val2017.json")
    assert [p["prompt"] for p in prompts] == ["a red box", "box"]
    (tmp_path / "bad.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        coco_records(tmp_path / "bad.json")


@pytest.mark.parametrize("fmt", ["token", "kaggle", "captions_txt"])
def test_flickr30k_formats(tmp_path, images, fmt):
    if fmt == "token":
        text = "0.jpg#0\tTwo dogs play .\n0.jpg#1\tDogs.\n1.jpg#0\tA man , smiling .\n"
        name = "results_20130124.token"
    elif fmt == "kaggle":
        text = "image_name| comment_number| comment\n0.jpg| 0| Two dogs play .\n0.jpg| 1| Dogs.\n1.jpg| 0| A man , smiling .\n"
        name = "results.csv"
    else:
        text = 'image,caption\n0.jpg,Two dogs play .\n0.jpg,Dogs.\n1.jpg,"A man , smiling ."\n'
        name = "captions.txt"
    (tmp_path / name).write_text(text)
    recs = flickr30k_records(tmp_path / name, images[0].parent)
    assert [r.caption for r in recs] == ["Two dogs play .", "Dogs.", "A man , smiling ."]
    assert recs[2].image == str(images[1])
    assert [p["prompt"] for p in flickr30k_prompts(tmp_path / name)] == ["Two dogs play .", "A man , smiling ."]


def test_flickr_unknown_format(tmp_path):
    (tmp_path / "x.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="unknown Flickr30k captions format"):
        flickr30k_records(tmp_path / "x.txt")


def test_imagenet_class_names():
    assert len(IMAGENET_CLASSES) == 1000 and len(set(IMAGENET_CLASSES)) == 1000
    anchors = {0: "tench", 1: "goldfish", 107: "jellyfish", 151: "Chihuahua", 281: "tabby cat", 291: "lion",
               340: "zebra", 388: "giant panda", 409: "analog clock", 504: "coffee mug", 610: "T-shirt",
               817: "sports car", 850: "teddy bear", 948: "Granny Smith apple", 954: "banana", 999: "toilet paper"}
    assert {i: IMAGENET_CLASSES[i] for i in anchors} == anchors
    p = imagenet_prompts("a photo of a {}")
    assert p[281] == {"class_index": 281, "class_name": "tabby cat", "prompt": "a photo of a tabby cat"}


def test_wrong_modes_are_converted(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent -> white background
    rgba.save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png")).min() == 255
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    Image.new("L", (4, 4), 7).save(tmp_path / "l.png")
    Image.fromarray(np.full((4, 4), 4000, dtype=np.uint16)).save(tmp_path / "i16.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    for name in ("p.png", "l.png", "i16.png", "c.jpg"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB", name
    assert load_image(tmp_path / "a.png", mode="L").mode == "L"


def test_bad_items_are_skipped_and_counted(tmp_path, images):
    (tmp_path / "trunc.jpg").write_bytes(images[0].read_bytes()[:40])
    recs = [(str(images[0]), "ok"), (str(tmp_path / "trunc.jpg"), "t"), (str(tmp_path / "gone.jpg"), "g"), (str(images[1]), "  ")]
    from fcr_train.data import CaptionRecord

    ds = ImageCaptionDataset([CaptionRecord(*r) for r in recs], resolution=6)
    assert ds.empty_captions == 1
    batch = collate_skip_bad([ds[i] for i in range(4)])
    assert batch["pixels"].shape == (2, 3, 6, 6) and batch["caption"] == ["ok", ""]
    assert batch["n_bad"] == 2 and any("trunc.jpg" in b for b in batch["bad"]) and any("gone.jpg" in b for b in batch["bad"])
    with pytest.raises(ValueError, match="no image-caption records"):
        ImageCaptionDataset([], name="empty")


def test_build_dataset_errors():
    with pytest.raises(ValueError, match="needs --data-path"):
        build_dataset(DataConfig(kind="coco"), resolution=8)
    with pytest.raises(ValueError, match="unknown data kind"):
        build_dataset(DataConfig(kind="imagenet", path="x"), resolution=8)


def test_webdataset_items_load_in_dataloader_workers(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (6, 6), (10 * i, 0, 0)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    ds = ImageCaptionDataset(webdataset_records(shard), resolution=6)
    assert ds[0] is not None  # opens the shard in this process
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == 4 and all(b["n_bad"] == 0 for b in batches)
