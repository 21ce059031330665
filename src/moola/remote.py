"""Fetch a named model from a DVC remote and check its bytes.

    python -m moola.remote get REPO NAME        # dvc artifacts get, then check the file's md5

`dvc artifacts get` (like `dvc get`) streams the file from the remote without re-hashing it, so a corrupted object
on the remote arrives as if it were fine (`verify = true` protects `dvc pull`, not these). This runs the same
`dvc artifacts get` into a temporary file beside the destination, compares the file's md5 with the one the
repository recorded for that version, and only then moves it into place; a mismatch leaves nothing behind.

    python -m moola.remote get git@github.com:team/moola.git selected-encoder --remote s3
    python -m moola.remote get ../moola exp4-block-mask-encoder --rev v0.0.1 -o encoders/

To pull a run's files, a plain `dvc pull` does the job: every output is pushed, and with `verify = true` a
missing or corrupted object makes it exit 1 naming the file (docs/gpu-box-and-remote.md, "Remotes").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from moola.errors import MoolaError, run_main

# A DVC 3 cache URL ends in files/md5/<2 hex>/<30 hex>: the md5 of the file's content.
_CACHE_URL = re.compile(r"files/md5/([0-9a-f]{2})/([0-9a-f]{30})$")


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_md5(url: str) -> str:
    """The md5 recorded for a file, read off its content-addressed location on the remote."""
    match = _CACHE_URL.search(url)
    if not match:
        raise MoolaError(f"{url}: not a single file in a DVC 3 cache (files/md5/xx/...); cannot check it")
    return match.group(1) + match.group(2)


def _dvc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


def get_artifact(
    repo: str,
    name: str,
    rev: str | None = None,
    out: Path | None = None,
    remote: str | None = None,
    remote_config: Sequence[str] = (),
) -> Path:
    """Download artifact `name` (at version `rev`, default the latest) from `repo`; returns the checked file."""
    from dvc.api import artifacts_show, get_url  # only this command needs DVC's API

    config = dict(item.split("=", 1) for item in remote_config)
    try:
        artifact = artifacts_show(name, version=rev, repo=repo)
        url = get_url(artifact["path"], repo=repo, rev=artifact["rev"], remote=remote, remote_config=config or None)
    except Exception as exc:  # DVC raises many kinds here (not a repo, no such artifact or version, no remote)
        version = f" version {rev}" if rev else ""
        raise MoolaError(f"{repo}: artifact '{name}'{version}: {' '.join(str(exc).split())}") from None
    want = expected_md5(url)
    filename = Path(artifact["path"]).name
    dest = Path(out) if out else Path(filename)
    if dest.is_dir() or str(out or "").endswith(("/", os.sep)):
        dest = dest / filename
    made_folder = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download_checked(repo, name, rev, remote, remote_config, url, want, dest)
    except MoolaError:
        if made_folder and not any(dest.parent.iterdir()):
            dest.parent.rmdir()  # a refused download leaves nothing behind, not even the folder it asked for
        raise
    return dest


def _download_checked(
    repo: str, name: str, rev: str | None, remote: str | None, remote_config: Sequence[str], url: str, want: str,
    dest: Path,
) -> None:
    """`dvc artifacts get` into a temporary file beside `dest`; moved to `dest` only if its md5 is `want`."""
    options = [*(["--rev", rev] if rev else []), *(["--remote", remote] if remote else [])]
    if remote_config:
        options += ["--remote-config", *remote_config]
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".moola-get-") as tmp:
        tmp_file = Path(tmp) / dest.name
        got = _dvc(["artifacts", "get", repo, name, "-o", str(tmp_file), *options])
        if got.returncode != 0 or not tmp_file.is_file():
            raise MoolaError(f"{repo}: could not download artifact '{name}' from {url}: {_last_line(got.stderr)}")
        found = md5_of(tmp_file)
        if found != want:
            raise MoolaError(
                f"{url}: artifact '{name}' is corrupted on the remote: its content has md5 {found}, "
                f"the repository recorded {want}; nothing was written to {dest}"
            )
        os.replace(tmp_file, dest)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moola.remote", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="dvc artifacts get, then check the file's md5 against the recorded one")
    get.add_argument("repo", help="the repository: a git URL or a local path")
    get.add_argument("name", help="artifact name from dvc.yaml (e.g. selected-encoder)")
    get.add_argument("--rev", help="artifact version (default: the latest registered)")
    get.add_argument("-o", "--out", help="file or folder to write (default: the artifact's file name)")
    get.add_argument("--remote", help="DVC remote to read (default: the repository's default remote)")
    get.add_argument("--remote-config", nargs="*", default=[], metavar="KEY=VALUE",
                     help="remote options, e.g. endpointurl=https://... (as for dvc artifacts get)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def _get() -> None:
        path = get_artifact(args.repo, args.name, args.rev, args.out, args.remote, args.remote_config)
        print(f"{path}: artifact '{args.name}' downloaded, md5 {md5_of(path)} matches the recorded one")

    run_main(_get)


if __name__ == "__main__":
    main()
