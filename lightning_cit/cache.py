"""The Arrow cache of task files (``$LIGHTNING_CIT_CACHE/datasets``): what is in it, and removing what is not needed.

Every ``.jsonl`` / ``.csv`` / ``.parquet`` task converts once into a memory-mapped Arrow file under
``$LIGHTNING_CIT_CACHE/datasets`` (:mod:`lightning_cit.tasks`). Nothing there is removed during a run. Each
conversion this library makes is recorded in ``datasets/lightning-cit-entries.json`` (entry directory
-> source file, the source's size and modification time, bytes, last use), and
``lightning-cit cache`` works from that record only:

    lightning-cit cache list                     # every recorded entry: size, last use, stale or not
    lightning-cit cache clean                    # remove the stale entries (source gone or changed: never read again)
    lightning-cit cache clean --older-than 30    # also entries not used for 30 days
    lightning-cit cache clean --all              # every recorded entry
    lightning-cit cache clean --dry-run ...      # say what would go

What a clean removes, and nothing else: the recorded entry directory (``<builder>/<config>/<version>[/<hash>]``,
inside the cache root, holding the Arrow files ``datasets`` wrote), the empty lock files ``datasets`` leaves
for it (``<version>_builder.lock``, ``<version>.incomplete_info.lock`` next to it, and the one named after its
path in the root) and directories left empty
between it and the root. Files this library did not record (another tool's cache, a dataset a user put
there, a conversion from before the record existed) are never touched; ``list`` counts them as unrecorded.
Processes that convert at the same moment may each rewrite the record; an entry lost that way is only
never cleaned, not cleaned wrongly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from lightning_cit.base import cache_root
from lightning_cit.results import atomic_write_json, human_size

RECORD = "lightning-cit-entries.json"


def datasets_root(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "datasets"


def _read(root: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_entry(dataset: Any, source: Path, stamp: str, root: Path | None = None) -> None:
    """Note the cache entry a conversion of ``source`` wrote or reused (called by :mod:`lightning_cit.tasks`)."""
    root = root or datasets_root()
    files = [Path(f["filename"]) for f in getattr(dataset, "cache_files", []) or []]
    if not files:
        return
    entry = files[0].parent.resolve()
    try:
        relative = entry.relative_to(root.resolve())
    except ValueError:
        return  # not in our cache (a datasets directory, a callable's dataset): not ours to clean
    entries = _read(root)
    entries[str(relative)] = {
        "source": str(source.resolve()), "stamp": stamp, "last_used": time.time(),
        "bytes": sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()),
    }
    try:
        atomic_write_json(root / RECORD, entries)
    except OSError:
        pass  # a read-only or full cache: the run goes on, the entry is only not recorded


def _stale(info: dict[str, Any]) -> bool:
    source = Path(info.get("source", ""))
    if not source.is_file():
        return True
    stat = source.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}" != info.get("stamp")


def list_entries(root: Path) -> list[dict[str, Any]]:
    """The recorded entries that still exist, each with ``path``, ``source``, ``bytes``, ``last_used``, ``stale``."""
    out = []
    for relative, info in sorted(_read(root).items()):
        if (root / relative).is_dir():
            out.append({"path": relative, **info, "stale": _stale(info)})
    return out


def _removable(root: Path, relative: str) -> Path | None:
    """The entry directory if it is safely ours: strictly inside the root, holding the Arrow output of ``datasets``."""
    if Path(relative).is_absolute() or ".." in Path(relative).parts or len(Path(relative).parts) < 2:
        return None
    entry = (root / relative).resolve()
    if root.resolve() not in entry.parents or entry.is_symlink() or not entry.is_dir():
        return None
    if not any(entry.glob("*.arrow")) or not (entry / "dataset_info.json").exists():
        return None
    return entry


def clean(root: Path, older_than_days: float | None = None, everything: bool = False, dry_run: bool = False) -> list[dict[str, Any]]:
    """Remove the recorded entries that are stale (or older than ``older_than_days``, or all); returns what went."""
    entries = _read(root)
    now, removed = time.time(), []
    for relative, info in sorted(entries.items()):
        old = older_than_days is not None and now - float(info.get("last_used", 0)) > older_than_days * 86400
        if not (everything or old or _stale(info)):
            continue
        entry = _removable(root, relative)
        if entry is None:
            if not (root / relative).exists():
                removed.append({"path": relative, **info, "bytes": 0})  # already gone: drop the record
            continue
        removed.append({"path": relative, **info})
        if dry_run:
            continue
        shutil.rmtree(entry)
        version_dir = entry if (entry.parent / f"{entry.name}_builder.lock").exists() else entry.parent
        locks = [version_dir.parent / f"{version_dir.name}_builder.lock", version_dir.parent / f"{version_dir.name}.incomplete_info.lock",
                 root / (str(version_dir).replace("/", "_") + ".lock")]  # the empty lock files datasets writes for the entry
        for lock in locks:
            if lock.is_file() and not lock.is_symlink() and lock.stat().st_size == 0:
                lock.unlink()
        parent = entry.parent
        while parent != root.resolve() and root.resolve() in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    if not dry_run and removed:
        for item in removed:
            entries.pop(item["path"], None)
        atomic_write_json(root / RECORD, entries)
    return removed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-cit cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="the cache root (default: $LIGHTNING_CIT_CACHE or ~/.cache/lightning-cit)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the recorded Arrow entries")
    cleaner = sub.add_parser("clean", help="remove stale recorded entries (source gone or changed)")
    cleaner.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="also entries not used for DAYS days")
    cleaner.add_argument("--all", action="store_true", help="every recorded entry")
    cleaner.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    args = parser.parse_args(argv)
    if getattr(args, "older_than", None) is not None and args.older_than < 0:
        parser.error(f"--older-than must be >= 0 days, got {args.older_than}")
    root = datasets_root(args.cache_dir)
    if args.command == "list":
        entries = list_entries(root)
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(e.get("last_used", 0))))
            print(f"{human_size(e.get('bytes', 0)):>9}  {used}  {'stale' if e['stale'] else 'ok   '}  {e['path']}  <- {e.get('source')}")
        print(f"{len(entries)} recorded entries, {human_size(sum(e.get('bytes', 0) for e in entries))} in {root} "
              f"({sum(e['stale'] for e in entries)} stale); files this library did not record are not listed")
        return 0
    removed = clean(root, args.older_than, args.all, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e['path']} ({human_size(e.get('bytes', 0))}) <- {e.get('source')}")
    print(f"{verb} {len(removed)} entries, {human_size(sum(e.get('bytes', 0) for e in removed))}")
    return 0


__all__ = ["clean", "datasets_root", "list_entries", "main", "record_entry"]
