"""The exchange between a flow and its GPU run: folders published to and fetched from fsspec storage."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from loraflow.tasks.exchange import fetch, publish
from loraflow.tasks.store import MANIFEST, Ref, building


def _finished_folder(store: Path) -> Ref:
    with building(store / "prompts-abc123") as tmp:
        (tmp / "train.parquet").write_bytes(b"\x00train" * 100)
        (tmp / "nested").mkdir()
        (tmp / "nested" / "labels.json").write_text('{"labels": ["no", "yes"]}')
    return Ref(path=str(store / "prompts-abc123"), digest="abc123")


@pytest.mark.parametrize("scheme", ["folder", "memory"])
def test_a_published_folder_comes_back_identical_on_the_other_side(tmp_path: Path, scheme: str) -> None:
    ref = _finished_folder(tmp_path / "here")
    storage = str(tmp_path / "exchange") if scheme == "folder" else f"memory://exchange-{tmp_path.name}"
    published = publish(ref, storage, str(tmp_path / "here"))
    assert published.path == f"{storage}/prompts-abc123" and published.digest == "abc123"

    fetched = fetch(published, storage, str(tmp_path / "there"))
    assert Path(fetched.path) == tmp_path / "there" / "prompts-abc123"
    assert fetched.digest == ref.digest
    for name in ("train.parquet", "nested/labels.json", MANIFEST):
        assert (Path(fetched.path) / name).read_bytes() == (Path(ref.path) / name).read_bytes()
    assert fetch(published, storage, str(tmp_path / "there")) == fetched  # already here: no copy
    if scheme == "folder":  # a local exchange links the files instead of copying the weights
        assert (tmp_path / "exchange" / "prompts-abc123" / "train.parquet").stat().st_nlink == 2


def test_a_ref_inside_a_folder_travels_with_its_whole_folder(tmp_path: Path) -> None:
    ref = _finished_folder(tmp_path / "here")
    inner = Ref(path=str(Path(ref.path) / "nested"), digest="abc123")
    storage = str(tmp_path / "exchange")
    published = publish(inner, storage, str(tmp_path / "here"))
    assert published.path == f"{storage}/prompts-abc123/nested"
    fetched = fetch(published, storage, str(tmp_path / "there"))
    assert fetched.path == str(tmp_path / "there" / "prompts-abc123" / "nested")
    assert (tmp_path / "there" / "prompts-abc123" / "train.parquet").is_file()
    with pytest.raises(ValueError, match="not under the exchange storage"):
        fetch(Ref(path="s3://elsewhere/prompts-abc123", digest="x"), storage, str(tmp_path / "there"))


def test_publishing_twice_reuses_the_published_folder(tmp_path: Path) -> None:
    ref = _finished_folder(tmp_path / "here")
    storage = str(tmp_path / "exchange")
    publish(ref, storage, str(tmp_path / "here"))
    marker = tmp_path / "exchange" / "prompts-abc123" / MANIFEST
    before = marker.stat().st_mtime_ns
    publish(ref, storage, str(tmp_path / "here"))
    assert marker.stat().st_mtime_ns == before


def test_an_unfinished_or_damaged_folder_is_never_fetched(tmp_path: Path) -> None:
    ref = _finished_folder(tmp_path / "here")
    storage = f"memory://damaged-{tmp_path.name}"
    published = publish(ref, storage, str(tmp_path / "here"))
    fs = fsspec.filesystem("memory")
    remote = f"/damaged-{tmp_path.name}/prompts-abc123"
    fs.pipe_file(f"{remote}/train.parquet", b"flipped bits")
    with pytest.raises(OSError, match="do not match"):
        fetch(published, storage, str(tmp_path / "there"))
    assert not (tmp_path / "there" / "prompts-abc123").exists()  # nothing half-fetched looks finished

    manifest = json.loads(fs.cat_file(f"{remote}/{MANIFEST}"))
    assert set(manifest) == {"train.parquet", "nested/labels.json"}
    fs.rm_file(f"{remote}/{MANIFEST}")
    with pytest.raises(FileNotFoundError, match="not a finished folder"):
        fetch(published, storage, str(tmp_path / "there"))
