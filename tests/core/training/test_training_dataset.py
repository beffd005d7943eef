"""Datasets: metadata formats, up-front checks naming the bad row and file, resolution, buckets, sharded batches."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from imagezoo.errors import InputError
from imagezoo.training.dataset import (
    BucketBatchSampler,
    ImageDataset,
    aspect_buckets,
    collate,
    dynamic_size,
    load_rows,
    nearest_bucket,
)


def _csv(folder, lines):
    (folder / "metadata.csv").write_text("image,prompt\n" + "\n".join(lines) + "\n")


def test_csv_rows_load_with_sizes_and_prompts(make_dataset):
    folder = make_dataset(3, size=(96, 64))
    report = load_rows(folder)
    assert [r.number for r in report.rows] == [2, 3, 4] and report.skipped == []
    assert report.rows[0].size == (96, 64) and report.rows[1].prompt == "a green striped pattern on a hill"


def test_every_allowed_suffix_loads(tmp_path, images):
    names = []
    for suffix in (".jpg", ".jpeg", ".png", ".webp"):
        names += [n.replace("img0", f"img{suffix[1:]}") for n in images(tmp_path, 1, suffix=suffix)]
        (tmp_path / f"img0{suffix}").rename(tmp_path / names[-1])
    _csv(tmp_path, [f"{n},p" for n in names])
    assert len(load_rows(tmp_path).rows) == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("missing.png,a cat", r"metadata\.csv line 3\): file '.*missing\.png' \(image\) does not exist"),
        ("img0.gif,a cat", r"line 3\): file '.*img0\.gif' \(image\) has suffix '\.gif'; allowed: \.jpg"),
        ("broken.png,a cat", r"line 3\): file '.*broken\.png' \(image\) is not a readable image"),
        (",a cat", r"line 3\): column 'image' \(a --data_file_keys entry\) is missing"),
    ],
)
def test_bad_rows_raise_before_training_naming_row_and_file(tmp_path, images, line, message):
    images(tmp_path, 1)
    (tmp_path / "img0.gif").write_bytes(b"GIF89a")
    data = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])  # truncated: fails only when decoded
    _csv(tmp_path, ["img0.png,fine", line])
    with pytest.raises(InputError, match=message):
        load_rows(tmp_path)


def test_skip_bad_rows_counts_them(tmp_path, images):
    images(tmp_path, 2)
    _csv(tmp_path, ["img0.png,a", "nope.png,b", "img1.png,c"])
    report = load_rows(tmp_path, skip_bad_rows=True)
    assert [r.prompt for r in report.rows] == ["a", "c"]
    assert len(report.skipped) == 1 and report.skipped[0].number == 3 and "nope.png" in report.skipped[0].reason


def test_missing_metadata_and_folder_are_errors(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        load_rows(tmp_path / "nope")
    with pytest.raises(InputError, match="No metadata file in"):
        load_rows(tmp_path)


def test_json_metadata_with_list_file_keys_and_extra_inputs(tmp_path, images):
    images(tmp_path, 3)
    rows = [
        {
            "image": "img0.png",
            "prompt": "a scene",
            "eligen_entity_prompts": ["a red thing", "a green thing"],
            "eligen_entity_masks": ["img1.png", "img2.png"],
        }
    ]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    keys = ["image", "eligen_entity_masks"]
    extras = ["eligen_entity_prompts", "eligen_entity_masks"]
    report = load_rows(tmp_path, file_keys=keys, extra_inputs=extras)
    sample = ImageDataset(report.rows, height=32, width=48)[0]
    masks = sample["extras"]["eligen_entity_masks"]
    assert [m.size for m in masks] == [(48, 32), (48, 32)] and sample["image"].shape == (3, 32, 48)
    assert sample["extras"]["eligen_entity_prompts"] == ["a red thing", "a green thing"]
    rows[0]["eligen_entity_masks"] = ["img1.png", "gone.png"]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    with pytest.raises(InputError, match=r"metadata\.json row 0\): file '.*gone\.png' \(eligen_entity_masks\)"):
        load_rows(tmp_path, file_keys=keys, extra_inputs=extras)


def test_fixed_size_resizes_to_cover_and_center_crops(tmp_path, images):
    images(tmp_path, 1, size=(128, 64))
    _csv(tmp_path, ["img0.png,p"])
    sample = ImageDataset(load_rows(tmp_path).rows, height=64, width=64)[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].min() >= -1 and sample["image"].max() <= 1
    expected = Image.open(tmp_path / "img0.png").convert("RGB").crop((32, 0, 96, 64))
    reference = torch.from_numpy(__import__("numpy").asarray(expected, dtype="float32") / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(sample["image"], reference)


def test_dynamic_resolution_caps_pixels_and_rounds_to_16():
    assert dynamic_size(1000, 500, 1024 * 1024) == (992, 496)
    w, h = dynamic_size(4000, 3000, 1024 * 1024)
    assert w * h <= 1024 * 1024 and w % 16 == 0 and h % 16 == 0 and abs(w / h - 4 / 3) < 0.02
    buckets = aspect_buckets(256 * 256)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 256 * 256 for w, h in buckets)
    assert nearest_bucket(200, 100, buckets)[0] > nearest_bucket(200, 100, buckets)[1]
    assert nearest_bucket(100, 100, buckets) == (256, 256)


def test_buckets_group_batches_by_size(tmp_path, images):
    sizes = [(96, 64), (64, 96), (96, 64), (64, 96), (96, 64)]
    for i, size in enumerate(sizes):
        images(tmp_path / "tmp", 1, size=size)
        (tmp_path / "tmp" / "img0.png").rename(tmp_path / f"img{i}.png")
    _csv(tmp_path, [f"img{i}.png,p{i}" for i in range(5)])
    dataset = ImageDataset(load_rows(tmp_path).rows, max_pixels=64 * 96, bucketed=True)
    sampler = BucketBatchSampler(dataset, 2, seed=1)
    batches = list(sampler)
    assert sorted(len(b) for b in batches) == [1, 2, 2] and sum(len(b) for b in batches) == 5
    for batch in batches:
        stacked = collate([dataset[i] for i in batch])
        assert stacked["image"].shape[0] == len(batch)


def test_sharded_batches_are_slices_of_the_combined_batch(make_dataset):
    dataset = ImageDataset(load_rows(make_dataset(4)).rows, height=64, width=64, repeat=2)
    combined = BucketBatchSampler(dataset, 4, seed=3)
    shards = [BucketBatchSampler(dataset, 2, seed=3, rank=r, num_replicas=2) for r in range(2)]
    for sampler in (combined, *shards):
        sampler.set_epoch(1)
    together = list(combined)
    apart = [list(s) for s in shards]
    assert len(together) == len(apart[0]) == len(apart[1]) == 2
    for k, batch in enumerate(together):
        assert batch == apart[0][k] + apart[1][k]
    shards[0].set_epoch(1, start=1)
    assert list(shards[0]) == apart[0][1:]


def test_collate_pads_cached_text_with_a_mask():
    samples = [
        {"index": 0, "row": 0, "size": (16, 16), "prompt": "a", "extras": {}, "text_embeds": torch.ones(3, 4)},
        {"index": 1, "row": 1, "size": (16, 16), "prompt": "b", "extras": {}, "text_embeds": torch.ones(5, 4)},
    ]
    batch = collate(samples)
    assert batch["text_embeds"].shape == (2, 5, 4) and batch["text_mask"].tolist()[0] == [1, 1, 1, 0, 0]
    assert batch["text_embeds"][0, 3:].abs().sum() == 0
    samples[1]["size"] = (32, 16)
    with pytest.raises(InputError, match="mixes image sizes"):
        collate(samples)
