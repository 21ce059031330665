"""A real S3 server on 127.0.0.1 for integration tests: moto in server mode, started and stopped by the tests.

Use it from a test module with `pytest_plugins = ["s3server"]` (fixture `s3_server`: one fresh server per test
module), or directly: `with S3Server() as s3: ...`. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# moto accepts any credentials; these are the conventional ones. The region must be set for boto3/aiobotocore.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """`moto_server -H 127.0.0.1 -p PORT` in a child process; `env` holds what a client needs to reach it."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"moto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client (dvc, boto3) that reaches this server with no configuration file:
        credentials, region, and the endpoint (botocore reads AWS_ENDPOINT_URL, and so does dvc-s3)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 30.0) -> S3Server:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CREDENTIALS},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        """A boto3 S3 client for the test's own look at the bucket (listing, corrupting an object)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])]

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> S3Server:
    """A fresh, empty moto S3 server for one test module."""
    with S3Server(log_dir=tmp_path_factory.mktemp("moto")) as server:
        yield server


# (endpoint, remote) -> the .dvc/config.local that configure_remote's `dvc remote modify` runs wrote into a
# repository that had none: a later repository without one gets the same bytes, without four more DVC start-ups.
_CONFIG_LOCAL: dict[tuple[str, str], str] = {}


def configure_remote(repo: Path, server: S3Server, remote: str = "s3") -> None:
    """Point `remote` of `repo` at `server` the documented way: .dvc/config.local (never committed)."""
    config = repo / ".dvc" / "config.local"
    had_config = config.exists()
    if not had_config and (server.endpoint, remote) in _CONFIG_LOCAL:
        config.write_text(_CONFIG_LOCAL[(server.endpoint, remote)])
        return
    settings = {
        "endpointurl": server.endpoint,
        "access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region": CREDENTIALS["AWS_DEFAULT_REGION"],
    }
    for key, value in settings.items():
        subprocess.run(
            [sys.executable, "-m", "dvc", "remote", "modify", "--local", remote, key, value],
            cwd=repo, check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        )
    if not had_config:
        _CONFIG_LOCAL[(server.endpoint, remote)] = config.read_text()
