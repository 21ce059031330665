"""Pull from a DVC remote and check that everything arrived; fetch a named model and check its bytes.

    python -m moola.remote pull [-r REMOTE]     # dvc pull, then fail naming any file that did not arrive
    python -m moola.remote get REPO NAME        # dvc artifacts get, then check the file's md5

`pull`: the augmented arrays are never pushed (`push: false`), so a plain `dvc pull` always ends with "Checkout
failed" for them, and `dvc pull --allow-missing` is the way to pull the rest; but --allow-missing also hides a
file that is missing on the remote or corrupted there (`verify = true` drops a corrupted download, and the pull
still exits 0). This runs `dvc pull --allow-missing`, then asks `dvc data status` which outputs are still not in
the cache, and fails naming each one that dvc.yaml does not mark `push: false`.

`get`: `dvc artifacts get` (like `dvc get`) streams the file from the remote without re-hashing it, so a corrupted object
on the remote arrives as if it were fine (`verify = true` protects `dvc pull`, not these). This runs the same
`dvc artifacts get` into a temporary file beside the destination, compares the file's md5 with the one the
repository recorded for that version, and only then moves it into place; a mismatch leaves nothing behind.

    python -m moola.remote get git@github.com:team/moola.git selected-encoder --remote s3
    python -m moola.remote get ../moola exp4-block-mask-encoder --rev v0.0.1 -o encoders/
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


def unpushed_outputs(root: Path = Path(".")) -> set[str]:
    """Outputs that dvc.yaml marks `push: false`: never on a remote, recomputed where needed."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {out.def_path for out in repo.index.outs if not out.can_push}


def pull(remote: str | None = None, root: Path = Path(".")) -> list[str]:
    """`dvc pull --allow-missing`, then the outputs still missing from the cache that should have arrived."""
    remote_args = ["-r", remote] if remote else []
    proc = subprocess.run([sys.executable, "-m", "dvc", "pull", "--allow-missing", *remote_args], cwd=root)
    if proc.returncode != 0:
        raise MoolaError(f"dvc pull {' '.join(remote_args)} failed (exit {proc.returncode}); see its message above")
    status = _dvc_json(["data", "status", "--json", "--granular"], root)
    return sorted(set(status.get("not_in_cache", [])) - unpushed_outputs(root))


def _dvc_json(args: list[str], root: Path) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MoolaError(f"dvc {' '.join(args)} failed: {_last_line(proc.stderr)}")
    return json.loads(proc.stdout or "{}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moola.remote", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pul = sub.add_parser("pull", help="dvc pull --allow-missing, then fail naming any pushed output that is missing")
    pul.add_argument("-r", "--remote", help="DVC remote (default: the default remote)")
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

    def _pull() -> None:
        missing = pull(args.remote)
        if missing:
            named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            where = f"remote '{args.remote}'" if args.remote else "the default remote"
            raise MoolaError(
                f"{named}: not pulled from {where}: missing there, or corrupted there and refused "
                f"by verify = true (`dvc pull -v` logs 'corrupted cache file'); the workspace does not have them"
            )
        print("pulled: every pushed output is here (the augmented arrays are never pushed: dvc repro remakes them)")

    run_main(_get if args.command == "get" else _pull)


if __name__ == "__main__":
    main()
