"""The loopback S3 server behaves as a bucket does for boto3 and fsspec."""

import fsspec


def test_s3_roundtrip_through_fsspec(s3_env):
    url = f"s3://{s3_env}/probe/hello.txt"
    with fsspec.open(url, "wb") as f:
        f.write(b"hello")
    with fsspec.open(url, "rb") as f:
        assert f.read() == b"hello"
    fs = fsspec.filesystem("s3")
    assert fs.ls(f"{s3_env}/probe") == [f"{s3_env}/probe/hello.txt"]
