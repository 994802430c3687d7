"""The storage policy: which errors are retried, for how long, and what a shard reader counts when
storage fails (a missing shard, an unreachable one), over the real moto server and a real proxy
process that cuts it off."""

from __future__ import annotations

import os
import threading
import time

import aiohttp
import boto3
import fsspec
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from fsspec.exceptions import FSTimeoutError

from cast.data.shards import Counters, iter_shards, list_shards
from cast.storage import (
    PERMANENT,
    TRANSIENT,
    PermanentStorageError,
    RetryPolicy,
    StorageUnreachable,
    classify,
    read_text,
    retry,
    write_text,
)
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder


def _client_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    "error, kind",
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), TRANSIENT),  # not an OSError
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), TRANSIENT),
        (aiohttp.ServerDisconnectedError(), TRANSIENT),
        (FSTimeoutError(), TRANSIENT),
        (ConnectionResetError(104, "reset"), TRANSIENT),
        (_client_error("SlowDown", 503), TRANSIENT),
        (_client_error("InternalError", 500), TRANSIENT),
        (OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7"), TRANSIENT),
        (FileNotFoundError("s3://b/x.tar"), PERMANENT),
        (PermissionError("AccessDenied"), PERMANENT),
        (_client_error("NoSuchBucket", 404), PERMANENT),
        (_client_error("AccessDenied", 403), PERMANENT),
        (OSError("AWS Error NO_SUCH_BUCKET during HeadBucket"), PERMANENT),
        (ValueError("not storage"), None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_errors_are_sorted_into_transient_and_permanent(error, kind):
    assert classify(error) == kind


def test_wrapped_errors_are_sorted_by_their_cause():
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://x")
        except EndpointConnectionError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert classify(outer) == TRANSIENT


def test_retry_backs_off_until_the_deadline_and_never_retries_a_permanent_error():
    now = [0.0]
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        now[0] += seconds + 1.0  # each attempt also takes 1 s

    def down():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    policy = RetryPolicy(deadline_s=20, first_delay_s=1, max_delay_s=4)
    with pytest.raises(StorageUnreachable, match=r"s3://b/k \(data.shards\): read still failing after 2\ds"):
        retry(down, "s3://b/k", policy, key="data.shards", what="read", sleep=sleep, clock=lambda: now[0])
    assert 3 <= len(delays) <= 20 and max(delays) <= 4  # exponential, capped, jittered
    assert now[0] >= 20

    flaky = iter([EndpointConnectionError(endpoint_url="http://x"), None])

    def once_down():
        error = next(flaky)
        if error:
            raise error
        return "ok"

    assert retry(once_down, "s3://b/k", policy, sleep=lambda s: None) == "ok"
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(PermanentStorageError, match=r"s3://b/k \(ray.storage_path\): .* not retried"):
        retry(missing, "s3://b/k", policy, key="ray.storage_path", sleep=lambda s: pytest.fail("retried"))
    assert calls == [1]
    with pytest.raises(ValueError):  # not a storage error: as it is
        retry(lambda: int("x"), "s3://b/k", policy)


def test_a_stop_event_ends_the_wait_early():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()

    def down():
        raise EndpointConnectionError(endpoint_url="http://x")

    with pytest.raises(StorageUnreachable):
        retry(down, "s3://b/k", RetryPolicy(deadline_s=60, first_delay_s=2, max_delay_s=2), stop=stop)
    assert time.monotonic() - start < 5


def _point_s3_at(monkeypatch, env: dict[str, str]) -> None:
    """Clients of this process to ``env``'s endpoint; botocore's own retries off (s3fs keeps its ~2 s),
    so that what rides out an outage here is the policy."""
    for key, value in {**env, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    fsspec.config.conf.pop("s3", None)
    fsspec.filesystem("s3").clear_instance_cache()


@pytest.fixture()
def s3_shards(tmp_path, s3_env):
    """12 samples in 3 shards of 4 on the moto server, listed by their manifest."""
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=6, size=32)
    dest = f"s3://{s3_env}/train"
    build_shards(str(tmp_path / "src"), dest, "imagefolder", max_count=4, seed=5, progress=False)
    return s3_env, dest


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_missing_shard_is_counted_as_missing_not_truncated(s3_shards, s3_server, prefetch):
    bucket, dest = s3_shards
    urls = [shard.url for shard in list_shards(dest).shards]
    boto3.client("s3", endpoint_url=s3_server.endpoint).delete_object(
        Bucket=bucket, Key=urls[1].split(f"{bucket}/", 1)[1]
    )
    counters = Counters()
    samples = list(iter_shards(urls, counters, prefetch=prefetch, policy=RetryPolicy(deadline_s=30)))
    assert len(samples) == 8
    assert counters == {"missing_shard": 1}
    assert urls[1] in counters.messages[0] and "not retried" in counters.messages[0]


def test_shards_survive_an_outage_shorter_than_the_deadline(s3_shards, s3_proxy, monkeypatch, caplog):
    _, dest = s3_shards
    urls = [shard.url for shard in list_shards(dest).shards]
    _point_s3_at(monkeypatch, s3_proxy.env)
    counters = Counters()
    samples = iter_shards(urls, counters, prefetch=1, policy=RetryPolicy(deadline_s=60, max_delay_s=1))
    first = [next(samples) for _ in range(4)]  # shard 0 read; the outage hits the fetches after it
    s3_proxy.stop()
    back = threading.Timer(5, s3_proxy.start)
    back.start()
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        rest = list(samples)
    back.join()
    assert len(first + rest) == 12 and counters == {}, counters.messages
    assert time.monotonic() - start >= 4  # the reader waited for S3 to come back
    assert ".tar: fetch failed" in caplog.text and "retrying in" in caplog.text


def test_an_unreachable_shard_is_skipped_and_counted_after_the_deadline(s3_shards, s3_proxy, monkeypatch):
    _, dest = s3_shards
    urls = [shard.url for shard in list_shards(dest).shards]
    _point_s3_at(monkeypatch, s3_proxy.env)
    s3_proxy.stop()
    for prefetch in (0, 1):
        counters = Counters()
        start = time.monotonic()
        samples = list(iter_shards(urls[:1], counters, prefetch=prefetch,
                                   policy=RetryPolicy(deadline_s=1, first_delay_s=0.2)))
        assert samples == [] and counters == {"unreachable_shard": 1}, counters.messages
        assert urls[0] in counters.messages[0] and "deadline 1s" in counters.messages[0]
        assert time.monotonic() - start < 30


def test_result_files_go_through_the_policy(s3_env, s3_proxy, monkeypatch):
    _point_s3_at(monkeypatch, s3_proxy.env)
    url = f"s3://{s3_env}/runs/a/result.json"
    cut = threading.Thread(target=s3_proxy.cut, args=(2,))
    cut.start()
    time.sleep(0.2)
    write_text(url, "{}\n", RetryPolicy(deadline_s=30, max_delay_s=1))  # written once S3 is back
    cut.join()
    assert read_text(url) == "{}\n"
    assert read_text(f"s3://{s3_env}/runs/a/none.json") is None


def test_tensorboard_sync_never_ends_a_run_and_catches_up(s3_env, s3_proxy, monkeypatch, caplog):
    import torch

    from cast.train.metrics import Reporter

    _point_s3_at(monkeypatch, s3_proxy.env)
    run = f"s3://{s3_env}/runs/tb"
    reporter = Reporter(run, rank=0, device=torch.device("cpu"), tensorboard=True,
                        retry=RetryPolicy(deadline_s=0.5, first_delay_s=0.1))
    reporter.writer.add_scalar("train/loss", 1.0, 1)
    s3_proxy.stop()
    with caplog.at_level("WARNING"):
        assert reporter.sync() is False  # warned, not raised
    assert f"{run}/tensorboard (ray.storage_path): TensorBoard sync still failing" in caplog.text
    s3_proxy.start()
    reporter.writer.add_scalar("train/loss", 0.5, 2)
    local = reporter.writer.logdir
    reporter.close()  # the next sync copies everything; the local copy goes
    fs = fsspec.filesystem("s3")
    assert any("events" in path for path in fs.find(f"{s3_env}/runs/tb/tensorboard"))
    assert not os.path.exists(local)
