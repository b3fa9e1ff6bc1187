"""cxr-ray's files in an object store: the mirror's commit protocol (on moto's S3 server and
on a local folder), and a shard set prepared into and read from ``s3://``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cxr_ray import storage
from cxr_ray.errors import UserError


@pytest.fixture(params=["s3", "local"])
def remote(request, tmp_path, monkeypatch) -> str:
    """A remote folder: a fresh prefix in the test S3 server, or a local directory."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    if request.param == "local":
        return str(tmp_path / "remote")
    for key, value in request.getfixturevalue("s3_server").items():
        monkeypatch.setenv(key, value)
    return f"s3://cxr/{request.node.name.replace('[', '-').rstrip(']')}-{os.getpid()}"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != storage.SYNC_FILE}


def test_push_then_pull_gives_the_same_tree_and_only_changes_travel(remote, tmp_path):
    src = tmp_path / "writer"
    (src / "checkpoint_epoch_0001").mkdir(parents=True)
    (src / "checkpoint_epoch_0001" / "checkpoint.pt").write_bytes(b"\x00" * 1000)
    (src / "history.jsonl").write_text('{"epoch": 1}\n')
    (src / "tensorboard").mkdir()
    (src / "tensorboard" / "events.out").write_bytes(b"tb1")
    writer = storage.Mirror(storage.locate(remote), src)
    uploaded = []
    original = storage.Location.upload

    def record(self, local):
        uploaded.append(Path(local).relative_to(src).as_posix())
        original(self, local)

    storage.Location.upload = record
    try:
        assert writer.push() == 3
        # the checkpoint travels before the files that describe it
        assert uploaded[0] == "checkpoint_epoch_0001/checkpoint.pt"
        uploaded.clear()
        assert writer.push() == 0 and uploaded == []  # nothing changed: nothing sent
        # the next epoch: a new checkpoint, the old one pruned, history appended
        (src / "checkpoint_epoch_0002").mkdir()
        (src / "checkpoint_epoch_0002" / "checkpoint.pt").write_bytes(b"\x01" * 1000)
        (src / "checkpoint_epoch_0001" / "checkpoint.pt").unlink()
        (src / "checkpoint_epoch_0001").rmdir()
        with open(src / "history.jsonl", "a") as fh:
            fh.write('{"epoch": 2}\n')
        assert writer.push() == 2
        assert uploaded == ["checkpoint_epoch_0002/checkpoint.pt", "history.jsonl"]
    finally:
        storage.Location.upload = original
    store = storage.locate(remote)
    assert "checkpoint_epoch_0001/checkpoint.pt" not in store.files()  # deleted after commit

    reader = storage.Mirror(storage.locate(remote), tmp_path / "reader")
    assert reader.pull()
    assert _tree(tmp_path / "reader") == _tree(src)
    assert reader.pull()  # again: already equal, nothing fetched or removed
    assert _tree(tmp_path / "reader") == _tree(src)


def test_what_a_killed_writer_sent_after_its_last_commit_is_never_read(remote, tmp_path):
    src = tmp_path / "writer"
    src.mkdir()
    (src / "summary.json").write_text("{}")
    storage.Mirror(storage.locate(remote), src).push()
    # a writer killed mid-push: its next checkpoint reached the store, the commit did not
    (storage.locate(remote) / "checkpoint_epoch_0009" / "checkpoint.pt").write_bytes(b"half")
    local = tmp_path / "resume"
    (local / "checkpoint_epoch_0008").mkdir(parents=True)  # local leftovers of the same kill
    (local / "checkpoint_epoch_0008" / "checkpoint.pt").write_bytes(b"old")
    assert storage.Mirror(storage.locate(remote), local).pull()
    assert _tree(local) == {"summary.json": b"{}"}
    # and a folder that was never committed reads as empty
    assert not storage.Mirror(storage.locate(remote) / "nothing", tmp_path / "empty").pull()


def test_a_writer_presumed_dead_cannot_overwrite_the_run_that_took_over(remote, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "history.jsonl").write_text("1\n")
    zombie = storage.Mirror(storage.locate(remote), tmp_path / "old")
    zombie.push()
    resumed = storage.Mirror(storage.locate(remote), tmp_path / "new")
    resumed.pull()
    (tmp_path / "new" / "history.jsonl").write_text("1\n2\n")
    resumed.push()  # builds on the zombie's commit: allowed
    (tmp_path / "old" / "history.jsonl").write_text("1\nX\n")
    with pytest.raises(storage.TakenOver, match="committed by another writer"):
        zombie.push()
    assert (storage.locate(remote) / "history.jsonl").read_text() == "1\n2\n"
    # an owner that handed the folder to another process takes it back deliberately
    zombie.refresh()
    zombie.push()
    assert (storage.locate(remote) / "history.jsonl").read_text() == "1\nX\n"


def test_skipped_prefixes_belong_to_other_writers(remote, tmp_path):
    exp = tmp_path / "driver"
    (exp / "stage1" / "run").mkdir(parents=True)
    (exp / "recipe.json").write_text("{}")
    (exp / "stage1" / "run" / "history.jsonl").write_text("")
    driver = storage.Mirror(storage.locate(remote), exp, skip=("stage1/",))
    driver.push()
    assert set(storage.locate(remote).files()) == {"recipe.json", storage.SYNC_FILE}
    driver.pull()
    assert (exp / "stage1" / "run" / "history.jsonl").is_file()  # not the driver's to remove


def test_the_endpoint_may_come_from_the_uri(s3_server, monkeypatch, tmp_path):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = s3_server["AWS_ENDPOINT_URL"].removeprefix("http://")
    folder = storage.locate(f"s3://cxr/query-{os.getpid()}?endpoint_override={host}&scheme=http")
    (folder / "a" / "b.txt").write_text("hi")
    assert str(folder / "a") == f"s3://cxr/query-{os.getpid()}/a"  # messages drop the query
    assert (folder / "a" / "b.txt").read_text() == "hi"
    assert set(folder.files()) == {"a/b.txt"}


def test_join_keeps_a_uris_query_last():
    assert storage.join("s3://b/exp?endpoint_override=h:1&scheme=http", "tune", "stage1") == \
        "s3://b/exp/tune/stage1?endpoint_override=h:1&scheme=http"
    assert storage.join("s3://b/exp/", "/run/") == "s3://b/exp/run"
    assert storage.join("/tmp/exp", "tune") == "/tmp/exp/tune"


def test_cache_paths_are_stable_and_distinct(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path))
    a = storage.cache_dir("s3://b/exp")
    assert a == storage.cache_dir("s3://b/exp") and a.is_relative_to(tmp_path)
    assert a != storage.cache_dir("s3://b/exp?endpoint_override=h:1")
    assert a != storage.cache_dir("gs://b/exp")
    assert storage.local_path(tmp_path / "x") == (tmp_path / "x").resolve()
    with pytest.raises(UserError, match=r"'ftp://h/x': not a storage URI"):
        storage.locate("ftp://h/x")


def test_a_shard_set_prepared_into_s3_reads_like_a_local_one(s3_env, tmp_path, monkeypatch,
                                                            local_shards):
    from cxr_ray.data import shards as shard_io
    from cxr_ray.data.prepare import PrepareConfig, decode_in_process, prepare

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    data = local_shards.parent / "data"
    uri = f"s3://cxr/shards-{os.getpid()}"
    result = prepare(PrepareConfig(data=data, out=uri, size=32),
                     decode_and_write=decode_in_process)
    assert not result.skipped and result.manifest["written"] == result.manifest["rows"]
    assert str(result.quarantine_path) == f"{uri}/quarantine.csv"
    store = storage.locate(uri)
    assert not [k for k in store.files() if ".staging-" in k]  # the decode's parts removed
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.parquet"))

    local = shard_io.open_shards(local_shards)
    remote = shard_io.open_shards(uri, expect_size=32)
    for split in ("train", "val", "test"):
        a, b = shard_io.read_split(local, "Effusion", split), shard_io.read_split(remote,
                                                                              "Effusion", split)
        order_a, order_b = np.argsort(a[1]), np.argsort(b[1])
        assert np.array_equal(a[1][order_a], b[1][order_b])
        assert np.array_equal(a[0][order_a], b[0][order_b])
        assert np.array_equal(a[2][order_a], b[2][order_b])

    again = prepare(PrepareConfig(data=data, out=uri, size=32),
                    decode_and_write=decode_in_process)
    assert again.skipped
    with pytest.raises(UserError, match=r"holds shards prepared with other settings \(size 32 → 48"):
        prepare(PrepareConfig(data=data, out=uri, size=48), decode_and_write=decode_in_process)
    # a damaged set (a shard gone) is refused with the file named
    first = json.loads((store / "manifest.json").read_bytes())["shards"][0]["file"]
    (store / first).delete()
    with pytest.raises(UserError, match=rf"is damaged: 1 file\(s\) listed .* e.g. {first}"):
        shard_io.open_shards(uri)


@pytest.mark.parametrize("command", [["status"], ["report"],
                                     ["predict", "--images", ".", "--out", "p.csv",
                                      "--launcher", "process"]])
def test_readers_name_the_uri_when_nothing_is_committed_there(command, s3_env, tmp_path,
                                                             monkeypatch, capsys):
    from cxr_ray import cli

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path))
    uri = f"s3://cxr/never-{os.getpid()}/exp"
    assert cli.main([command[0], "--experiment", uri, *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{uri}: no cxr-ray experiment committed there (no recipe.json); "
                            "pass storage_path/name of a sweep's recipe"), err
