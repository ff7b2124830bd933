"""The golden store on S3: moto's server on loopback, the shared conformance class,
the commands, SIGKILL mid-write, and the server going away mid-write and mid-read.

Faults are injected by a small TCP proxy between moesnap and moto: stopping it
refuses new connections and resets open ones, while moto (and what it stores)
stays up so the test can check what was left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import struct
import threading
import time
import uuid

import pytest

pytest.importorskip("s3fs", reason="the test extra installs s3fs")
moto_server = pytest.importorskip("moto.server", reason="the test extra installs moto[server]")
boto3 = pytest.importorskip("boto3")

from moesnap.cli.main import main  # noqa: E402
from moesnap.store import MARKER, RemoteGoldenStore  # noqa: E402

from test_goldens import _wait_for, run_cli  # noqa: E402
from moesnap.testing.store import StoreConformance, same_arrays, small_case  # noqa: E402

META = {"model": {"file": "m.gguf", "sha256": "ab" * 32}, "dtype": "float32"}


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server in a thread on 127.0.0.1 (a free port), with the AWS variables pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield {"endpoint": endpoint, "port": port}
    server.stop()


@pytest.fixture
def s3(moto):
    return boto3.client("s3", endpoint_url=moto["endpoint"])


@pytest.fixture
def bucket(s3):
    name = f"b{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


def objects(s3, bucket: str, prefix: str = "") -> dict[str, str]:
    """sha256 of every object under prefix."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = hashlib.sha256(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()).hexdigest()
    return out


class Proxy:
    """A loopback TCP proxy to moto that can be cut: new connections refused, open ones reset."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.nbytes = 0
        self.requests: list[str] = []    # "GET /bucket/key" lines seen from the client
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            upstream.settimeout(None)
            with self.lock:
                if self.stopped:       # accepted while stop() ran: reset it too
                    self._reset(client)
                    self._reset(upstream)
                    return
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self.lock:
                    self.nbytes += len(data)
                    if from_client:
                        self.requests += [line.decode("latin-1") for line in data.split(b"\r\n")
                                          if line[:4] in (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE")]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _reset(s: socket.socket) -> None:
        # shutdown() acts at once, even while a pump thread is blocked in recv() on this socket
        # (close() alone would wait for that recv to return)
        for step in (lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
                     lambda: s.shutdown(socket.SHUT_RDWR), s.close):
            try:
                step()
            except OSError:
                pass

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            try:   # wakes the blocked accept() and stops listening (close alone leaves it to accept())
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            for s in self.conns:
                self._reset(s)


# ---------------------------------------------------------------- conformance


def keys_under(store: RemoteGoldenStore, prefix: str) -> list[str]:
    resp = boto3.client("s3").list_objects_v2(Bucket=store.test_bucket, Prefix=f"goldens/{prefix}")
    return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.fixture
def s3_store(bucket):
    st = RemoteGoldenStore(f"s3://{bucket}/goldens")
    st.test_bucket = bucket
    yield st
    st.close()


@pytest.mark.slow   # ~20 s against moto; the light run keeps the S3-specific tests below
class TestS3Store(StoreConformance):
    stale_after = 0.0      # S3 cannot tell a dead writer from a live one but by the age of its last write

    @pytest.fixture
    def store(self, s3_store):
        return s3_store

    def flip_bit(self, store, suite, version, case, path):
        s3 = boto3.client("s3")
        key = [k for k in keys_under(store, f"{suite}/{version}/{case}/{path}/c/")][-1]
        data = bytearray(s3.get_object(Bucket=store.test_bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0x01
        s3.put_object(Bucket=store.test_bucket, Key=key, Body=bytes(data))

    def remove_array(self, store, suite, version, case, path):
        s3 = boto3.client("s3")
        for key in keys_under(store, f"{suite}/{version}/{case}/{path}/"):
            s3.delete_object(Bucket=store.test_bucket, Key=key)

    def crash(self, store, writer):
        writer._done = True   # the process is gone: nothing aborts, nothing commits



class TestS3Claims:
    """What only an object store needs: claims by conditional put, the marker written last."""

    @pytest.fixture
    def store(self, s3_store):
        return s3_store

    def test_claim_then_marker_layout(self, store):
        v = store.publish("s", {"case0": small_case(0)}, META)
        keys = keys_under(store, f"s/{v.version}/")
        assert f"goldens/s/{v.version}/{MARKER}" in keys and f"goldens/s/{v.version}/zarr.json" in keys
        assert not any(k.endswith("claim.json") for k in keys)

    def test_a_claimed_name_is_never_reused(self, store):
        w = store.begin("s")                 # claims v0001 and holds it
        v = store.publish("s", {"case0": small_case(1)}, META)
        assert v.version == "v0002"
        w.add_case("case0", small_case(0))
        assert w.commit(META).version == "v0001"
        assert store.versions("s") == ["v0001", "v0002"]
        assert same_arrays(store.resolve("s@v0002").read_case("case0"), small_case(1))


# ---------------------------------------------------------------- the commands on S3


@pytest.fixture(scope="module")
def s3_golden(moto, tiny_path):
    """A bucket with tiny@v0001 generated through the CLI."""
    s3 = boto3.client("s3", endpoint_url=moto["endpoint"])
    bucket = f"g{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/goldens"
    assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "tiny", "--store", url,
                 "--prompt", "Hi"]) == 0
    return {"bucket": bucket, "url": url, "v1": objects(s3, bucket, "goldens/tiny/v0001/")}


def test_cli_generate_list_show_diff_prune(s3_golden, tiny_path, capsys):
    url = s3_golden["url"]
    capsys.readouterr()
    assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "tiny", "--store", url,
                 "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out == "tiny@v0002\n"
    assert main(["-q", "goldens", "list", "--store", url]) == 0
    assert capsys.readouterr().out.startswith("tiny  v0001 v0002  newest v0002: tiny.gguf")
    assert main(["-q", "goldens", "show", "tiny@v0001", "--store", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tiny@v0001  ({url}/tiny/v0001)") and "22 arrays, all verified" in out
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", url]) == 0
    assert "identical: all" in capsys.readouterr().out
    assert main(["-q", "goldens", "prune", "tiny", "--keep", "1", "--store", url]) == 0
    assert "deleted v0001; kept v0002" in capsys.readouterr().out
    assert RemoteGoldenStore(url).versions("tiny") == ["v0002"]


def test_unknown_bucket_and_suite(moto, capsys):
    assert main(["-q", "goldens", "list", "--store", "s3://no-such-bucket/x"]) == 2
    assert capsys.readouterr().err == "moesnap: error: s3://no-such-bucket/x: no such bucket 'no-such-bucket'\n"
    assert main(["-q", "goldens", "show", "tiny", "--store", "s3:///x"]) == 2
    assert "no bucket" in capsys.readouterr().err
    assert main(["-q", "goldens", "list", "--store", "gs://bucket/x"]) == 2
    assert "only local directories and s3://bucket/prefix" in capsys.readouterr().err


def test_bad_s3_settings_are_usage_errors(moto, monkeypatch, capsys):
    monkeypatch.setenv("MOESNAP_S3_ATTEMPTS", "lots")
    assert main(["-q", "goldens", "list", "--store", "s3://any/x"]) == 2
    assert capsys.readouterr().err == "moesnap: error: MOESNAP_S3_ATTEMPTS='lots': expected a whole number\n"


@pytest.fixture
def s3_one(moto, tiny_path, s3):
    """A fresh bucket holding tiny@v0001 (a small synthetic case), and its objects' digests."""
    bucket = f"c{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/goldens"
    with RemoteGoldenStore(url) as st:
        assert st.publish("tiny", {"case0": small_case(0)}, META).version == "v0001"
    return {"bucket": bucket, "url": url, "v1": objects(s3, bucket, "goldens/tiny/v0001/")}


def test_sigkill_mid_write_on_s3(s3_one, s3, tiny_path, capsys):
    bucket, url = s3_one["bucket"], s3_one["url"]
    p = run_cli("-q", "goldens", "generate", tiny_path, "--suite", "tiny", "--store", url, "--tokens", "1,2,3,4",
                write_delay=0.03)
    _wait_for(lambda: any("/c/" in k for k in objects(s3, bucket, "goldens/tiny/v0002/case0/")), proc=p)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert objects(s3, bucket, "goldens/tiny/v0002/")                    # half a version is there...
    assert RemoteGoldenStore(url).versions("tiny") == ["v0001"]          # ...and nobody sees it
    capsys.readouterr()
    assert main(["-q", "goldens", "list", "--store", url]) == 0
    assert "tiny  v0001  newest v0001" in capsys.readouterr().out
    assert main(["-q", "goldens", "show", "tiny@v0002", "--store", url]) == 2
    assert objects(s3, bucket, "goldens/tiny/v0001/") == s3_one["v1"]
    # a young leftover is left alone (its writer may be alive); an old one is pruned
    assert main(["-q", "goldens", "prune", "tiny", "--keep", "3", "--store", url]) == 0
    assert objects(s3, bucket, "goldens/tiny/v0002/")
    assert main(["-q", "goldens", "prune", "tiny", "--keep", "3", "--store", url, "--stale-after", "0"]) == 0
    assert "removed unpublished v0002" in capsys.readouterr().out
    assert not objects(s3, bucket, "goldens/tiny/v0002/")
    assert objects(s3, bucket, "goldens/tiny/v0001/") == s3_one["v1"]


def test_server_gone_mid_write(s3_one, s3, moto, tiny_path):
    bucket, url = s3_one["bucket"], s3_one["url"]
    proxy = Proxy(moto["port"])
    p = run_cli("-q", "goldens", "generate", tiny_path, "--suite", "tiny", "--store", url, "--tokens", "1,2,3,4",
                write_delay=0.03,
                env={"MOESNAP_S3_ATTEMPTS": "1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    _wait_for(lambda: any("/c/" in k for k in objects(s3, bucket, "goldens/tiny/v0002/case0/")), proc=p)
    t0 = time.monotonic()
    proxy.stop()
    out, err = p.communicate(timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 2, err
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"moesnap: error: {url}/tiny/v0002") and "S3 storage error" in err, err
    assert took < 60
    assert RemoteGoldenStore(url).versions("tiny") == ["v0001"]
    assert objects(s3, bucket, "goldens/tiny/v0001/") == s3_one["v1"]


def test_server_gone_mid_read(s3_one, moto):
    url = s3_one["url"]
    proxy = Proxy(moto["port"])
    p = run_cli("-q", "goldens", "show", "tiny", "--store", url,
                read_delay=1.5, env={"MOESNAP_S3_ATTEMPTS": "1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    # the version's metadata came through; the reader now waits before reading case0's arrays
    _wait_for(lambda: any("/tiny/v0001/zarr.json" in r for r in proxy.requests), proc=p)
    time.sleep(0.3)
    proxy.stop()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"moesnap: error: {url}/tiny/v0001/case0") and "error" in err, err
    # and with the server unreachable from the start
    p = run_cli("-q", "goldens", "list", "--store", url,
                env={"MOESNAP_S3_ATTEMPTS": "1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.count("\n") == 1 and "S3 storage error" in err, err


class _Bug(Exception):
    """An error no storage fault makes: a bug, which must surface as it is."""


def test_removing_the_claim_after_publishing(moto, bucket, monkeypatch):
    """The claim inside a published version is removed on a best effort: a refusal from the server
    leaves it (published all the same); a bug is not swallowed."""
    from moesnap.store import CLAIM
    from moesnap.testing.store import small_case

    st = RemoteGoldenStore(f"s3://{bucket}/goldens")
    real = st._root.delete

    def refusing(error):
        async def delete(key):
            if key.endswith(CLAIM):
                raise error
            return await real(key)
        return delete

    monkeypatch.setattr(st._root, "delete", refusing(PermissionError("access denied")))
    st.publish("s", {"case0": small_case(0)}, META)
    assert st.versions("s") == ["v0001"] and st._get_bytes(f"s/v0001/{CLAIM}") is not None
    monkeypatch.setattr(st._root, "delete", refusing(_Bug("in our code")))
    with pytest.raises(_Bug, match="in our code"):
        st.publish("s", {"case0": small_case(1)}, META)
