"""`moola figures DIR`: every plot of `dvc plots show` (or of `dvc plots diff REV ...`) as PNG or SVG files.

The specs are DVC's own: `dvc plots show --json` fills the templates of .dvc/plots/ with the plot files' rows, so a
picture here is what `dvc plots show` draws. vl-convert (the `figures` extra: pip install -e ".[figures]") renders
them offline: no browser, and no network (external data requests are refused).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from moola import io
from moola.errors import DataError, MoolaError, run_main

FORMATS = ("png", "svg")


def plot_specs(revs: list[str], cwd: Path = Path(".")) -> tuple[dict[str, dict], dict[str, str]]:
    """(plot name -> filled Vega-Lite spec, plot name -> why it has none) from DVC's JSON output."""
    cmd = ["dvc", "plots", "diff", *revs, "--json"] if revs else ["dvc", "plots", "show", "--json"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {why}")
    try:
        shown = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise DataError(f"`{' '.join(cmd)}`: expected JSON on stdout ({exc})") from exc
    specs: dict[str, dict] = {}
    for name, entries in (shown.get("data") or {}).items():
        content = next((e.get("content") for e in entries if e.get("type") == "vega" and e.get("content")), None)
        if content and content.get("data", {}).get("values"):
            specs[name] = content
    missing: dict[str, str] = {name: "no data" for name in shown.get("data") or {} if name not in specs}
    for error in shown.get("errors") or []:  # each: name (a plot's, or none), rev, source, type, msg
        name = error.get("name") or f"revision {error.get('rev')}"
        why = f"{error.get('source') or error.get('rev')}: {error.get('msg') or error.get('type')}"
        if name not in specs:
            missing[name] = why if missing.get(name, "no data") == "no data" else f"{missing[name]}; {why}"
    return specs, missing


def file_stem(name: str) -> str:
    """A file name for a plot title: 'Held-out MCC against labeled windows (95% ...)' -> 'held-out-mcc-against-...'."""
    short = re.sub(r"\s*\([^()]*\)\s*$", "", name)  # the trailing parenthesis only: titles differ before it
    return re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-") or "plot"


def render(spec: dict, fmt: str, scale: float = 2.0) -> bytes:
    import vl_convert

    if fmt == "png":
        return vl_convert.vegalite_to_png(spec, scale=scale, allowed_base_urls=[])
    return vl_convert.vegalite_to_svg(spec, allowed_base_urls=[]).encode()


def write_figures(out_dir: Path, formats: list[str], revs: list[str], cwd: Path = Path(".")) -> list[Path]:
    """Render every plot DVC shows into out_dir, one file per plot and format; returns the files written."""
    try:
        import vl_convert  # noqa: F401
    except ImportError as exc:
        raise MoolaError("moola figures needs vl-convert-python: pip install -e \".[figures]\"") from exc
    specs, missing = plot_specs(revs, cwd)
    for name, why in missing.items():
        print(f"skipped '{name}': {why}", file=sys.stderr, flush=True)
    if not specs:
        raise DataError("dvc plots show gave no plot with data (run the pipeline first: `moola tour` or `dvc repro`)")
    written = []
    stems: dict[str, int] = {}
    for name, spec in specs.items():
        stem = file_stem(name)
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:
            stem = f"{stem}-{stems[stem]}"
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            io.write_bytes(path, render(spec, fmt), what=f"the figure '{name}'")
            written.append(path)
            print(f"wrote {path}  ({name})", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moola figures", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, metavar="DIR", help="folder to write the figures into")
    parser.add_argument("--format", dest="formats", action="append", choices=FORMATS,
                        help="png or svg (repeat for both; default png)")
    parser.add_argument("--rev", dest="revs", action="append", default=[], metavar="REV",
                        help="draw `dvc plots diff` of these revisions (git revisions or experiment names; "
                             "one REV: that revision against the workspace); repeat for more")
    args = parser.parse_args(argv)
    run_main(lambda: write_figures(args.out_dir, args.formats or ["png"], args.revs))


if __name__ == "__main__":
    main()
