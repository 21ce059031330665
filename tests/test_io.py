"""Atomic writes: a kill at any moment leaves the old file or the new one, never half of one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moola import io

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys
from moola import io
size = int(sys.argv[2])
i = 0
while True:  # rewrite the file forever with ever-new content, until killed
    i += 1
    io.write_bytes(sys.argv[1], bytes([i % 251]) * size)
"""


def test_kill_during_writes_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    size = 30_000_000
    io.write_bytes(target, b"\x00" * size)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(size)], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == size and data.count(data[:1]) == size  # one whole version, never a mix
    # The killed writer's temporary file is removed by the next write of the same output.
    io.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"x": 1})
    try:
        io.write_json(target, {"x": float("nan")})  # not valid JSON: refused before anything is written
    except io.OutputError:
        pass
    assert target.read_text() == '{\n  "x": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_torch_bytes_do_not_depend_on_the_destination_name(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 3}
    io.write_torch(tmp_path / "one.pt", state)
    io.write_torch(tmp_path / "two.pt", state)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "two.pt", weights_only=True)["w"], state["w"])


def test_outputs_get_ordinary_permissions(tmp_path):
    io.write_npy(tmp_path / "a.npy", np.zeros(3))
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o666 & ~io._UMASK


def test_a_refused_write_names_the_path_and_what_was_written(tmp_path):
    from moola.errors import OutputError

    blocker = tmp_path / "metrics"
    blocker.write_text("a file where a folder should be")
    try:
        io.write_json(blocker / "finetune.json", {"accuracy": 0.5})
    except OutputError as exc:
        message = str(exc)
    else:
        raise AssertionError("no OutputError")
    assert message.startswith(f"{blocker / 'finetune.json'}: could not write JSON (") and "File exists [errno 17]" in message
    assert "\n" not in message


def test_npy_trailer_keeps_a_plain_npy_and_catches_a_flipped_bit(tmp_path):
    array = np.random.default_rng(0).random((50, 7, 4), dtype=np.float32)
    path = tmp_path / "a.npy"
    io.write_npy(path, array)
    assert np.array_equal(np.load(path), array) and np.array_equal(np.load(path, mmap_mode="r"), array)
    assert io.npy_checksum_problem(path) is None
    first = path.read_bytes()
    io.write_npy(tmp_path / "b.npy", array)
    assert (tmp_path / "b.npy").read_bytes() == first  # deterministic
    data = bytearray(first)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert "fails its checksum" in io.npy_checksum_problem(path)
    np.save(path, array)  # a plain .npy: no trailer, nothing to verify it against
    assert "has no checksum trailer" in io.npy_checksum_problem(path)


def test_run_main_turns_any_other_oserror_into_one_line(tmp_path, capsys):
    import pytest

    from moola.errors import run_main

    missing = tmp_path / "nowhere" / "file.bin"
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: missing.read_bytes())
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {missing}: No such file or directory (errno 2; FileNotFoundError)"]
