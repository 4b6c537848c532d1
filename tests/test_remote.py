"""data/remote.py: shard locations over HTTP and S3 (local servers on 127.0.0.1), the shard cache."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from image_classification.data import remote
from image_classification.errors import UserError
from tests.helpers.shard_servers import serve_http, serve_s3


@pytest.fixture
def shards(tmp_path):
    """Three 'shards' of distinct bytes in a served folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    for index in range(3):
        (folder / f"train-{index:06d}.tar").write_bytes(bytes([index]) * (50_000 + index))
    return folder


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def test_brace_ranges_expand_in_order_and_bad_patterns_are_one_line():
    assert remote.expand("https://h.example/d/train-{000000..000002}.tar") == [
        "https://h.example/d/train-000000.tar", "https://h.example/d/train-000001.tar",
        "https://h.example/d/train-000002.tar"]
    assert remote.expand("s3://b/{val,train}-{0..1}.tar") == [
        "s3://b/train-0.tar", "s3://b/train-1.tar", "s3://b/val-0.tar", "s3://b/val-1.tar"]
    with pytest.raises(UserError, match="unbalanced braces"):
        remote.expand("https://h.example/train-{0..3.tar")
    with pytest.raises(UserError, match="cannot be listed; name the shards with a brace range"):
        remote.expand("https://h.example/d/train-*.tar")


def test_local_patterns_expand_braces_then_globs(shards):
    assert remote.expand(str(shards / "train-{000001..000002}.tar")) == [
        str(shards / "train-000001.tar"), str(shards / "train-000002.tar")]
    with pytest.raises(UserError, match=r"7 of the 9 shard\(s\) it names do not exist"):  # (before: the 2 that did)
        remote.expand(str(shards / "train-{000001..000009}.tar"))
    assert remote.expand(f"file://{shards}/*-00000[02].tar") == [
        str(shards / "train-000000.tar"), str(shards / "train-000002.tar")]
    assert remote.list_dir(str(shards)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_http_shard_is_downloaded_once_into_the_cache(shards, tmp_path):
    cache = tmp_path / "cache"
    with serve_http(shards) as server:
        url = server.url + "/train-000001.tar"
        path = remote.local_copy(url, str(cache))
        assert open(path, "rb").read() == (shards / "train-000001.tar").read_bytes()
        assert remote.local_copy(url, str(cache)) == path
        assert server.gets["/train-000001.tar"] == 1
        assert remote.exists(url) and not remote.exists(server.url + "/missing.tar")
        port = server.server_address[1]
    assert path == str(cache / "http" / f"127.0.0.1_{port}" / "train-000001.tar")
    assert open(os.path.join(os.path.dirname(path), ".train-000001.tar.from")).read() == \
        f"http://127.0.0.1:{port}/train-000001.tar\n"
    assert not [name for name in files_under(cache) if name.endswith(".part")]


def test_dropped_connections_are_retried(shards, tmp_path):
    with serve_http(shards, drops=remote.ATTEMPTS - 1) as server:
        path = remote.local_copy(server.url + "/train-000002.tar", str(tmp_path / "cache"))
        assert server.gets["/train-000002.tar"] == remote.ATTEMPTS
    assert open(path, "rb").read() == (shards / "train-000002.tar").read_bytes()


def test_a_connection_that_always_drops_is_one_line_naming_the_shard(shards, tmp_path):
    cache = tmp_path / "cache"
    with serve_http(shards, fail_always=True) as server:
        url = server.url + "/train-000000.tar"
        with pytest.raises(UserError) as caught:
            remote.local_copy(url, str(cache))
        assert server.gets["/train-000000.tar"] == remote.ATTEMPTS
    message = str(caught.value)
    assert message.startswith(f"shard {url}: download failed after {remote.ATTEMPTS} attempts: ")
    assert "\n" not in message
    assert "Not enough data to satisfy content length header (received 25000 of 50000 bytes)" in message
    assert [name for name in files_under(cache) if not name.endswith(".lock")] == []  # no part file left


def test_a_missing_shard_is_one_line(shards, tmp_path):
    with serve_http(shards) as server:
        with pytest.raises(UserError, match=r"^shard http://127\.0\.0\.1:\d+/nope\.tar: not found$"):
            remote.local_copy(server.url + "/nope.tar", str(tmp_path / "cache"))


def _copy_in_child(url, cache, barrier, results):
    barrier.wait(timeout=30)
    results.put(remote.local_copy(url, cache))


def test_two_processes_share_one_download(shards, tmp_path):
    context = multiprocessing.get_context("fork")  # as DataLoader workers start
    cache = str(tmp_path / "cache")
    with serve_http(shards, delay_s=0.5) as server:  # long enough for both to be inside local_copy
        url = server.url + "/train-000000.tar"
        barrier, results = context.Barrier(2), context.Queue()
        children = [context.Process(target=_copy_in_child, args=(url, cache, barrier, results)) for _ in range(2)]
        for child in children:
            child.start()
        for child in children:
            child.join(timeout=60)
        assert [child.exitcode for child in children] == [0, 0]
        paths = {results.get(timeout=5) for _ in children}
        assert server.gets["/train-000000.tar"] == 1
    assert len(paths) == 1 and open(paths.pop(), "rb").read() == (shards / "train-000000.tar").read_bytes()


def test_the_size_cap_evicts_only_shards_the_cache_wrote(shards, tmp_path):
    cache = tmp_path / "cache"
    with serve_http(shards) as server:
        host = cache / "http" / f"127.0.0.1_{server.server_address[1]}"
        host.mkdir(parents=True)
        (host / "foreign.tar").write_bytes(b"x" * 200_000)          # put there by someone else
        os.utime(host / "foreign.tar", (1, 1))                      # and the least recently used
        first = remote.local_copy(server.url + "/train-000000.tar", str(cache))
        os.utime(first, (2, 2))
        cap = 2 * 50_002  # room for two of our shards
        second = remote.local_copy(server.url + "/train-000001.tar", str(cache), max_cache_bytes=cap)
        assert os.path.exists(first) and os.path.exists(second)
        third = remote.local_copy(server.url + "/train-000002.tar", str(cache), max_cache_bytes=cap)
        assert not os.path.exists(first)   # ours and the oldest: evicted
        assert os.path.exists(second) and os.path.exists(third)
        assert (host / "foreign.tar").read_bytes() == b"x" * 200_000
        assert remote.evict(str(cache), 0) == [second, third]  # never the foreign file, even at 0 bytes
        assert files_under(cache / "http") == [os.path.relpath(host / name, cache / "http") for name in (
            ".train-000000.tar.lock", ".train-000001.tar.lock", ".train-000002.tar.lock", "foreign.tar")]


def test_cache_names_hold_no_credentials_and_keep_queries_apart(tmp_path):
    plain = remote.cache_path("/c", "https://user:secret@h.example:8443/a/b/x.tar")
    assert plain == "/c/https/h.example_8443/a/b/x.tar"
    signed = remote.cache_path("/c", "https://h.example/a/x.tar?sig=1")
    assert signed.startswith("/c/https/h.example/a/q-") and signed.endswith("/x.tar")
    assert signed != remote.cache_path("/c", "https://h.example/a/x.tar?sig=2")
    with pytest.raises(UserError, match="without '..'"):
        remote.cache_path("/c", "https://h.example/a/../../x.tar")


def test_s3_globs_listing_and_reading(tmp_path):
    objects = {"data/train-000000.tar": b"a" * 1000, "data/train-000001.tar": b"b" * 10,
               "data/val-000000.tar": b"c", "data/classes.txt": b"cat\ndog\n"}
    with serve_s3({"shards": objects}):
        assert remote.expand("s3://shards/data/train-*.tar") == [
            "s3://shards/data/train-000000.tar", "s3://shards/data/train-000001.tar"]
        assert remote.list_dir("s3://shards/data/") == [
            "classes.txt", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
        assert remote.exists("s3://shards/data/classes.txt")
        assert not remote.exists("s3://shards/data/train-000002.tar")
        path = remote.local_copy("s3://shards/data/train-000000.tar", str(tmp_path / "cache"))
        assert path == str(tmp_path / "cache" / "s3" / "shards" / "data" / "train-000000.tar")
        assert open(path, "rb").read() == b"a" * 1000
        with pytest.raises(UserError, match=r"^shard s3://shards/data/nope\.tar: not found$"):
            remote.local_copy("s3://shards/data/nope.tar", str(tmp_path / "cache"))
        with pytest.raises(UserError, match="not found"):
            remote.list_dir("s3://no-such-bucket/data")


def test_converted_shards_stream_over_http_and_s3(tmp_path):
    """prepare --to webdataset, then the shard layer reads them from a URL: index files first, each shard once."""
    from image_classification.data import sources
    from image_classification.data.prepare import cli as prepare
    from tests.helpers.tiny_data import write_imagefolder

    src = write_imagefolder(tmp_path / "src", train_per_class=10, val_per_class=2, size=16)
    dst = tmp_path / "served" / "wds"
    assert prepare.main(["-j", "1", "--to", "webdataset", "--shard-samples", "8", str(src), str(dst)]) == 0
    local = sources.open_source(str(dst), "train")
    expected = [(local.read(i), int(local.labels[i])) for i in range(len(local))]
    cache = tmp_path / "cache"
    with serve_http(tmp_path / "served") as server:
        pattern = server.url + "/wds/train-{000000..000002}.tar"
        streamed = sources.open_source(None, "train", shards=pattern, cache_dir=str(cache))
        assert streamed.kind == "webdataset" and streamed.class_names == ["cat", "dog"]
        tars = {path: count for path, count in server.gets.items() if path.endswith(".tar")}
        assert tars == {}  # opening read the index files beside the shards, not the shards
        assert [(streamed.read(i), int(streamed.labels[i])) for i in range(len(streamed))] == expected
        assert {path: count for path, count in server.gets.items() if path.endswith(".tar")} == {
            f"/wds/train-00000{k}.tar": 1 for k in range(3)}
        with pytest.raises(UserError, match=r"cannot be listed; name the shards with a brace range"):
            sources.open_source(server.url + "/wds", "train", cache_dir=str(cache))
    objects = {f"wds/{name}": (dst / name).read_bytes() for name in os.listdir(dst) if not name.startswith(".")}
    with serve_s3({"shards": objects}):
        from_s3 = sources.open_source("s3://shards/wds", "train", cache_dir=str(tmp_path / "s3-cache"))
        assert from_s3.describe().startswith("webdataset s3://shards/wds: 3 shard(s), 20 samples, 2 classes")
        assert [(from_s3.read(i), int(from_s3.labels[i])) for i in range(len(from_s3))] == expected


def test_pytorch_loader_workers_stream_each_shard_once(tmp_path):
    """Two DataLoader workers read HTTP shards through one shard cache: every shard crosses the wire once."""
    import torch

    from image_classification.data import registry
    from image_classification.data.contract import LoaderConfig
    from image_classification.data.prepare import cli as prepare
    from tests.helpers.tiny_data import write_imagefolder

    src = write_imagefolder(tmp_path / "src", train_per_class=12, val_per_class=2, size=16)
    dst = tmp_path / "served" / "wds"
    assert prepare.main(["-j", "1", "--to", "webdataset", "--shard-samples", "6", str(src), str(dst)]) == 0
    with serve_http(tmp_path / "served") as server:
        config = LoaderConfig(
            data_dir=None, image_size=16, val_resize_size=16, batch_size=4, workers=2, prefetch=2,
            interpolation="bilinear", augmentation="none", memory_format=torch.contiguous_format,
            device=torch.device("cpu"), train_shards=server.url + "/wds/train-{000000..000003}.tar",
            cache_dir=str(tmp_path / "cache"))
        loader = registry.get("pytorch").train_loader(config)
        loader.set_epoch(0)
        labels = torch.cat([batch_labels for _, batch_labels in loader])
        assert sorted(labels.tolist()) == [0] * 12 + [1] * 12
        assert {path: count for path, count in server.gets.items() if path.endswith(".tar")} == {
            f"/wds/train-00000{k}.tar": 1 for k in range(4)}
