"""``wardpost watchlist``: enrol, list, remove and export watchlist persons on this device.

The watchlist of a ``camera_face`` driver instance lives in its state folder
(``<agent.state_dir>/drivers/<name>/watchlist.db``). Run these commands as the
service user so the files stay writable by the agent; a running agent picks up
changes within a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2

from agent.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_section
from drivers.camera_face.config import CameraFaceConfig
from drivers.camera_face.models import ModelError
from drivers.camera_face.pipeline import FacePipeline, Vector
from drivers.camera_face.watchlist import DEFAULT_LIST, FILE_NAME, Watchlist, WatchlistError

DRIVER_TYPE = "camera_face"


def add_cli(subparsers: Any) -> None:
    """Add ``watchlist`` and its sub-commands to the ``wardpost`` command line."""
    parser = subparsers.add_parser("watchlist", help="face watchlist of a camera_face driver")
    commands = parser.add_subparsers(dest="watchlist_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--config",
            default=str(DEFAULT_CONFIG_PATH),
            help=f"config file (default {DEFAULT_CONFIG_PATH})",
        )
        sub.add_argument(
            "--driver",
            default="",
            help="camera_face driver instance (default: the only one configured)",
        )
        return sub

    add = command("add", "enrol a person from one or more photos")
    add.add_argument("--id", required=True, help="the person's id at the centre")
    add.add_argument("--name", required=True, help="the person's name")
    add.add_argument("--list", default=DEFAULT_LIST, help=f"list name (default {DEFAULT_LIST})")
    add.add_argument("images", nargs="+", metavar="IMAGE", help="photos of the person")
    add.set_defaults(func=_add)

    listing = command("list", "show the enrolled persons")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_list)

    remove = command("remove", "remove a person")
    remove.add_argument("id", help="the person's id")
    remove.set_defaults(func=_remove)

    export = command("export", "write the whole list with embeddings as JSON")
    export.add_argument("--output", "-o", default="-", help="file (default: standard output)")
    export.set_defaults(func=_export)


def _driver(args: argparse.Namespace) -> tuple[str, CameraFaceConfig, Path]:
    """The chosen driver's name, validated options and state folder."""
    config = load_config(args.config)
    cameras = [d for d in config.drivers if d.type == DRIVER_TYPE]
    if args.driver:
        chosen = [d for d in cameras if d.name == args.driver]
        if not chosen:
            names = ", ".join(d.name for d in cameras) or "none"
            raise ConfigError(
                f"no camera_face driver named {args.driver!r} (configured: {names})",
                file=config.source,
            )
    elif len(cameras) == 1:
        chosen = cameras
    else:
        names = ", ".join(d.name for d in cameras)
        raise ConfigError(
            f"choose a camera_face driver with --driver ({names})"
            if cameras
            else "no camera_face driver is configured",
            file=config.source,
        )
    section = chosen[0]
    try:
        options = parse_section(CameraFaceConfig, section.options, f"drivers.{section.name}")
    except ConfigError as exc:
        raise exc.located(config.source) from None
    state_dir = Path(config.agent.state_dir) / "drivers" / section.name
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    return section.name, options, state_dir


def _fail(message: str) -> int:
    print(f"wardpost watchlist: {message}", file=sys.stderr)
    return 1


def _add(args: argparse.Namespace) -> int:
    try:
        _, options, state_dir = _driver(args)
        pipeline = FacePipeline.from_config(options)
    except (ConfigError, ModelError) as exc:
        return _fail(str(exc))
    vectors: list[Vector] = []
    for name in args.images:
        image = cv2.imread(name, cv2.IMREAD_COLOR)
        if image is None:
            print(f"{name}: cannot be read as an image")
            continue
        embedding, faces = pipeline.enrolment_embedding(image)
        note = " (used the largest)" if faces > 1 else ""
        print(f"{name}: {faces} face{'s' if faces != 1 else ''} found{note}")
        if embedding is not None:
            vectors.append(embedding)
    if not vectors:
        return _fail(f"no face found in the {len(args.images)} images: {args.id!r} not added")
    model = options.embedder_file
    try:
        watchlist = Watchlist(
            state_dir / FILE_NAME, model.name, model.sha256, pipeline.embedder.dimension
        )
        try:
            version = watchlist.add(
                args.id,
                args.name,
                vectors,
                list_name=args.list,
                source="cli:" + ",".join(Path(n).name for n in args.images),
            )
        finally:
            watchlist.close()
    except WatchlistError as exc:
        return _fail(str(exc))
    print(
        f"added {args.id} ({args.name}, list {args.list}) from {len(vectors)} of "
        f"{len(args.images)} images; watchlist version {version}"
    )
    return 0


def _open(args: argparse.Namespace) -> Watchlist:
    _, _, state_dir = _driver(args)
    return Watchlist(state_dir / FILE_NAME)


def _threshold_note(options: CameraFaceConfig, photos: int) -> str:
    """The decision threshold for this list and where it comes from."""
    threshold = options.threshold_for(photos)
    if options.threshold:
        return f"threshold {threshold:.3f} (configured)"
    return (
        f"threshold {threshold:.3f} (calibrated for FPIR {options.target_fpir:g} with "
        f"{photos} enrolled photos; it rises as the list grows)"
    )


def _list(args: argparse.Namespace) -> int:
    try:
        _, options, state_dir = _driver(args)
        watchlist = Watchlist(state_dir / FILE_NAME)
    except (ConfigError, WatchlistError) as exc:
        return _fail(str(exc))
    try:
        persons, summary = watchlist.persons(), watchlist.summary()
    finally:
        watchlist.close()
    threshold = options.threshold_for(summary["embeddings"])
    if args.json:
        print(
            json.dumps({**summary, "threshold": round(threshold, 4), "entries": persons}, indent=2)
        )
        return 0
    print(
        f"watchlist version {summary['version']}, model {summary['model'] or '(none yet)'}, "
        f"{summary['persons']} persons, {summary['embeddings']} photos; "
        f"{_threshold_note(options, summary['embeddings'])}"
    )
    for person in persons:
        added = datetime.fromtimestamp(person["added_at"], UTC).strftime("%Y-%m-%d %H:%M")
        print(
            f"  {person['id']:<16} {person['name']:<28} {person['list']:<12} "
            f"{person['embeddings']:>3} photos  added {added}Z  {person['source']}"
        )
    return 0


def _remove(args: argparse.Namespace) -> int:
    try:
        watchlist = _open(args)
        try:
            removed, version = watchlist.remove(args.id)
        finally:
            watchlist.close()
    except (ConfigError, WatchlistError) as exc:
        return _fail(str(exc))
    if not removed:
        return _fail(f"{args.id!r} is not on the watchlist (version {version})")
    print(f"removed {args.id}; watchlist version {version}")
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        watchlist = _open(args)
        try:
            document: dict[str, Any] = watchlist.export()
        finally:
            watchlist.close()
    except (ConfigError, WatchlistError) as exc:
        return _fail(str(exc))
    text = json.dumps(document, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(
            f"wrote {len(document['persons'])} persons (version {document['version']}) "
            f"to {args.output}"
        )
    return 0
