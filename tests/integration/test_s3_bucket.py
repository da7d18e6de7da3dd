"""The chunk store's view of an S3 bucket (targets/objects.py) against a real S3 HTTP
server on loopback, with faults injected by an HTTP proxy between them."""

from __future__ import annotations

import os
from typing import Any

import pytest

from hamal_workers.config import S3Section
from hamal_workers.targets.objects import Bucket, ObjectError, ObjectMissing
from hamal_workers.testbeds import s3 as testbed
from hamal_workers.testbeds.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(120)


def section(endpoint: str, **keys: object) -> S3Section:
    base: dict[str, object] = {
        "endpoint_url": endpoint, "bucket": "hamal", "prefix": "site-1/store",
        "access_key": testbed.ACCESS_KEY, "secret_key": testbed.SECRET_KEY,
        "max_attempts": 4, "connect_timeout": 2, "read_timeout": 5,
    }  # fmt: skip
    return S3Section(**{**base, **keys})  # type: ignore[arg-type]


def test_objects_round_trip_under_the_prefix(s3: Any) -> None:
    bucket = Bucket(section(s3.endpoint_url))
    bucket.check()
    data = os.urandom(3 * 1024 * 1024 + 5)
    bucket.put("chunks/ab/cd/abcd", data, {"length": "12"})
    bucket.put("points/vm%2F1/p1/point.json", b"{}")
    bucket.put("points/vm%2F1/p2/point.json", b"{}")
    assert bucket.get("chunks/ab/cd/abcd") == data
    assert bucket.get("chunks/ab/cd/abcd", 10, 19) == data[10:20]
    info = bucket.head("chunks/ab/cd/abcd")
    assert info is not None and (info.size, info.metadata) == (len(data), {"length": "12"})
    assert bucket.head("chunks/nope") is None
    with pytest.raises(ObjectMissing, match=r"s3://hamal/site-1/store/chunks/nope at http"):
        bucket.get("chunks/nope")
    assert sorted(bucket.children("points/vm%2F1/")) == ["p1", "p2"]
    assert [o.key for o in bucket.list("points/")] == [
        "points/vm%2F1/p1/point.json", "points/vm%2F1/p2/point.json"
    ]  # fmt: skip
    bucket.copy("points/vm%2F1/p1/point.json", "gc/deleted/vm%2F1/p1/point.json")
    bucket.delete(["points/vm%2F1/p1/point.json", "never/was"])
    assert [o.key for o in bucket.list("points/")] == ["points/vm%2F1/p2/point.json"]
    # Outside the prefix, nothing: the store's keys are all under site-1/store/.
    listed = s3.client().list_objects_v2(Bucket="hamal")["Contents"]
    assert all(o["Key"].startswith("site-1/store/") for o in listed)


def test_throttling_5xx_and_dropped_connections_are_retried(s3: Any) -> None:
    with FaultProxy(s3.endpoint_url) as proxy:
        bucket = Bucket(section(proxy.url))
        proxy.fail(503, count=2, method="PUT")
        proxy.fail(500, count=1, method="GET")
        proxy.drop(count=1, method="GET")
        bucket.put("chunks/x", b"payload")
        assert bucket.get("chunks/x") == b"payload"
        answered = [what for _, path, what in proxy.calls if path.endswith("/chunks/x")]
        assert answered == ["503", "503", "200", "500", "dropped", "200"], proxy.calls


def test_a_slow_answer_within_the_read_timeout_is_waited_for(s3: Any) -> None:
    with FaultProxy(s3.endpoint_url) as proxy:
        bucket = Bucket(section(proxy.url, read_timeout=5))
        bucket.put("chunks/slow", b"late but whole")
        proxy.delay(1.0, count=1, method="GET")
        assert bucket.get("chunks/slow") == b"late but whole"


def test_an_s3_that_stays_down_fails_clearly_without_secrets(s3: Any) -> None:
    with FaultProxy(s3.endpoint_url) as proxy:
        bucket = Bucket(section(proxy.url, max_attempts=3))
        proxy.down()
        with pytest.raises(ObjectError) as failed:
            bucket.put("chunks/y", b"payload")
        message = str(failed.value)
        assert "writing s3://hamal/site-1/store/chunks/y" in message, message
        assert "after up to 3 attempts" in message and "SlowDown" in message, message
        assert testbed.SECRET_KEY not in message and testbed.ACCESS_KEY not in message
        assert [what for *_, what in proxy.calls] == ["503"] * 3
        proxy.up()
        bucket.put("chunks/y", b"payload")  # back: the same call goes through
    unreachable = Bucket(section(proxy.url, max_attempts=2, connect_timeout=1))
    with pytest.raises(ObjectError, match="failed after 2 attempts: Could not connect"):
        unreachable.get("chunks/y")


def test_a_missing_bucket_is_named(s3: Any) -> None:
    with pytest.raises(ObjectMissing, match="bucket nope does not exist at http"):
        Bucket(section(s3.endpoint_url, bucket="nope")).check()
    with pytest.raises(ObjectError, match=r"\[s3\] bucket is empty"):
        Bucket(section(s3.endpoint_url, bucket=""))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_the_endpoint_certificate_is_checked(tmp_path: Any) -> None:
    with testbed.start(tmp_path / "tls", tls=True) as server:
        server.create_bucket("hamal")
        trusted = Bucket(section(server.endpoint_url, ca_bundle=str(server.ca_file)))
        trusted.put("k", b"v")
        with pytest.raises(ObjectError, match=r"is not trusted .*set \[s3\] ca_bundle"):
            Bucket(section(server.endpoint_url, max_attempts=1)).get("k")  # the system's CAs
        assert Bucket(section(server.endpoint_url, insecure=True)).get("k") == b"v"
