"""The data sources of the ``download`` stage → images + dlib XML for train and test.

Every source writes the same layout into ``out_dir`` (``data/raw`` in the pipeline), built in a temporary
folder and renamed into place (:func:`facemarks.core.atomic.atomic_dir`), so ``data/raw`` is either the old complete
tree or the new complete one:

- ``train.xml``, ``test.xml``: dlib landmark XML, ``file`` attributes relative to ``out_dir``;
- the images they name (``images/<split>/…`` for synthetic and local, the extracted archive tree for ibug300w).

Sources (``data.source``):

- ``synthetic``: :func:`facemarks.data.synthetic.generate_split` seeded by ``base.seed`` (it seeds each image from
  ``(seed, split, index)``).
- ``ibug300w``: dlib's 300-W tarball, downloaded with resume and a SHA-256 check (:func:`download`),
  extracted safely (:func:`safe_extract`); dlib's ``labels_ibug_300W_{train,test}.xml`` give the split.
- ``local``: a folder with dlib XML (``*train*.xml`` + ``*test*.xml``, or a single XML split by
  ``data.local.test_fraction``), or images with 300-W ``.pts`` files beside them (same stem). ``.pts`` points
  are 1-indexed and are shifted to the project's 0-indexed pixel centres; the face box of a ``.pts`` face is the
  tight box of its points, ``(min x, min y, max x − min x + 1, max y − min y + 1)``, so every point lies inside it.
  The used images are copied under ``images/<split>/`` (``data/raw`` must be self-contained for DVC).
- ``photos``: a folder of unlabelled photos (``data.photos.path``) labelled by dlib's 68-point predictor as teacher
  (:mod:`facemarks.data.teacher`: every face dlib's HOG detector finds, the detector box mapped onto the training-box
  convention, labels cached by image SHA-256), split by file (``data.photos.test_fraction``), mixed with
  ``data.photos.synthetic`` synthetic training faces (and ``data.synthetic.n_test`` synthetic test faces); each
  training photo is listed ``data.photos.repeat`` times. Photos are copied byte for byte under
  ``images/photos/<split>/``; ``teacher.json`` records per photo its SHA-256, split and the teacher of each face.

Every record is validated (:func:`validate_records`): missing or undecodable image, wrong point count,
non-finite or absurd coordinates (farther than one image size outside the image), zero-area box, duplicate
(same file and box twice). ``data.on_bad: error`` raises :class:`~facemarks.core.io.DataError` naming the file and the
problem; ``skip`` drops the item, logs one warning line and counts it by reason in the summary. Points that lie
outside their box or image but within those bounds are kept (later stages mark them not visible) and counted.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import logging
import os
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath


from facemarks.data import groups, local, synthetic, teacher
from facemarks.core.atomic import atomic_dir, atomic_write_text
from facemarks.core.hashing import file_sha256
from facemarks.core.io import DataError, ImageRecord, read_dlib_xml, write_dlib_xml
from facemarks.core.params import Data, Ibug300w, compile_rule
from facemarks.data.validate import face_problem, validate_records, validate_splits

log = logging.getLogger("facemarks.data.sources")

IBUG_LISTS = {"train": "labels_ibug_300W_train.xml", "test": "labels_ibug_300W_test.xml"}
OFFLINE_HINT = ("no network? set `data.source: synthetic` (built-in generator, works offline) or "
                "`data.source: local` with `data.local.path` pointing at a folder you already have")
_CHUNK = 1 << 20

#: ``(image path on disk, record)`` pairs of one split, and the splits by name (``train``, ``test``).
Items = list[tuple[Path, ImageRecord]]
Splits = dict[str, Items]


class DownloadError(RuntimeError):
    """The archive could not be fetched (offline, refused, HTTP error, interrupted); the message says what to do."""


# ================================================================================================ fetch
def fetch(data: Data, seed: int, out_dir: Path, progress: bool | None = None) -> dict:
    """Build ``out_dir`` (train.xml, test.xml, images) for ``data.source``; return the summary for
    ``metrics/download.json``.

    The summary holds ``source``, ``n_{train,test}_{images,faces}``, ``n_skipped``, ``skipped`` (reason → count),
    ``n_points_outside_box``, ``n_points_outside_image`` and source details (``sha256`` for ibug300w).
    """
    out_dir = Path(out_dir)
    if data.source == "ibug300w":
        # Download outside the temporary tree: the cached tarball survives a failed extraction.
        tar_path, digest = fetch_ibug_archive(data.ibug300w, progress)
    if data.source == "photos":
        photo_files = teacher.preflight(data.photos)  # no images / no peers extra: one line, before any work
        tutor = teacher.Teacher(data.photos.cache_dir, data.photos.upsample, data.photos.min_score)
    skipped: collections.Counter = collections.Counter()
    with atomic_dir(out_dir) as tmp:
        if data.source == "synthetic":
            splits, extra = _synthetic_splits(data, seed, tmp), {}
        elif data.source == "ibug300w":
            splits = _ibug_splits(tar_path, tmp)
            extra = {"url": data.ibug300w.url, "sha256": digest, "archive": tar_path.name}
        elif data.source == "local":
            splits, extra = local.local_splits(data.local, seed, data.on_bad, skipped), {"local_path": data.local.path}
        elif data.source == "photos":
            splits, photo_images, teacher_summary = _photos_splits(data, seed, tmp, photo_files, tutor, skipped)
        else:
            raise DataError(f"data.source = {data.source!r}: unknown source (synthetic, ibug300w, local, photos)")
        checked, stats = validate_splits(splits, data.on_bad, skipped)
        if data.source == "local":
            kept = local.copy_local_images(checked, tmp)
        elif data.source == "photos":
            kept = teacher.mix(checked, tmp, photo_images, data.photos.repeat)
            teacher_summary.update(repeat=data.photos.repeat, n_synthetic_train=data.photos.synthetic,
                                   n_photo_train_listings=sum(data.photos.repeat * len(photo_images[f]["faces"])
                                                              for f in photo_images
                                                              if photo_images[f]["split"] == "train"))
            teacher.write_record(tmp, photo_images, tutor, teacher_summary)
            extra = {"photos_path": data.photos.path, "teacher": teacher_summary}
        else:
            kept = {split: [rec for _, rec in items] for split, items in checked.items()}
        for split, records in kept.items():
            if not records:
                raise DataError(f"{data.source}: no usable {split} images left (skipped: {dict(skipped) or 'none'})")
            write_dlib_xml(tmp / f"{split}.xml", records, name=f"facemarks {data.source} {split}")
        rule = data.local.group if data.source == "local" else ""
        split_groups = _record_groups(checked, kept, rule)
        if rule:
            groups.write_groups(tmp, rule, {rec.file: g for split, records in kept.items()
                                            for rec, g in zip(records, split_groups[split])})
    summary = {"source": data.source, "on_bad": data.on_bad, **stats, **extra,
               "n_skipped": int(sum(skipped.values())), "skipped": dict(sorted(skipped.items())),
               "groups": {"rule": rule or "file", **groups.summary(split_groups)}}
    for split, records in kept.items():
        summary[f"n_{split}_images"] = len(records)
        summary[f"n_{split}_faces"] = sum(len(r.faces) for r in records)
    if skipped:
        log.warning("skipped %d bad item(s): %s", summary["n_skipped"], summary["skipped"])
    if data.source == "photos":
        summary["run"] = tutor.counters()  # run facts (cache hits, dlib calls): the stage moves them to timings/
    return summary


def _record_groups(checked: Splits, kept: dict[str, list[ImageRecord]], rule: str) -> dict[str, list[str]]:
    """Each kept record's person group per split: the ``data.local.group`` rule on its source image's file name
    (``checked`` items and ``kept`` records are in the same order), or — without a rule — its own file."""
    if not rule:
        return {split: [rec.file for rec in records] for split, records in kept.items()}
    compiled = compile_rule(rule)
    return {split: local.item_groups(checked[split], compiled) for split in kept}


# ================================================================================================ synthetic
def _synthetic_splits(data: Data, seed: int, root: Path) -> Splits:
    cfg = data.synthetic
    splits = {}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        records = synthetic.generate_split(root, split, n, seed, cfg)  # seeded per (seed, split, image)
        splits[split] = [(root / r.file, r) for r in records]
    return splits


def _photos_splits(data: Data, seed: int, root: Path, files: list[Path], tutor, skipped: collections.Counter):
    """``data.photos.synthetic`` synthetic training faces (the first of the synthetic source's, same seed) and
    ``data.synthetic.n_test`` synthetic test faces, plus the teacher-labelled photos split by file
    (:func:`facemarks.data.teacher.photo_items`) → ``(splits, photo record, teacher summary)``."""
    cfg = data.synthetic
    splits: Splits = {}
    for split, n in (("train", data.photos.synthetic), ("test", cfg.n_test)):
        records = synthetic.generate_split(root, split, n, seed, cfg) if n else []
        splits[split] = [(root / r.file, r) for r in records]
    photos, images, summary = teacher.photo_items(files, data.photos, seed, tutor, data.on_bad, skipped)
    for split in splits:
        splits[split] += photos[split]
    return splits, images, summary


# ================================================================================================ ibug300w
def fetch_ibug_archive(cfg: Ibug300w, progress: bool | None = None) -> tuple[Path, str]:
    """Download (or reuse) the tarball under ``cfg.cache_dir``; returns ``(path, sha256 hex)``."""
    name = PurePosixPath(urllib.parse.urlparse(cfg.url).path).name or "ibug300w.tar.gz"
    dest = Path(cfg.cache_dir) / name
    digest = download(cfg.url, dest, cfg.sha256, cfg.timeout_s, progress)
    return dest, digest


def _ibug_splits(tar_path: Path, root: Path) -> Splits:
    safe_extract(tar_path, root)
    splits = {}
    for split, list_name in IBUG_LISTS.items():
        found = sorted(root.rglob(list_name))
        if len(found) != 1:
            raise DataError(f"{tar_path}: expected exactly one {list_name} in the archive, found {len(found)}")
        splits[split] = _rebased(found[0], read_dlib_xml(found[0]), root)
    return splits


def _rebased(xml_path: Path, records: list[ImageRecord], root: Path) -> Items:
    """Pair each record with its image path; ``file`` becomes relative to ``root`` (the extracted tree)."""
    rel_dir = PurePosixPath(xml_path.parent.relative_to(root).as_posix())
    return [(xml_path.parent / r.file, ImageRecord(file=str(rel_dir / r.file), faces=r.faces)) for r in records]


# ------------------------------------------------------------------------------------------------ download
def download(url: str, dest: Path, sha256: str = "", timeout_s: float = 30, progress: bool | None = None,
             attempts: int = 3) -> str:
    """Fetch ``url`` into ``dest`` with resume and a SHA-256 check; return the hex digest.

    Bytes stream into ``<dest>.part``; an existing ``.part`` is resumed with ``Range: bytes=N-`` (a ``206``
    reply appends, a ``200`` reply starts over). A connection cut mid-stream is retried (``attempts`` in all),
    resuming each time. The digest must equal ``sha256`` when given; otherwise the first complete download
    records it in ``<dest>.sha256`` and a later mismatch is refused. ``dest`` is only replaced by a verified file.
    ``progress``: ``False`` silent; otherwise a tqdm bar when stderr is a terminal, else a log line every 5 s.
    Raises :class:`DownloadError` when the server cannot be reached, :class:`DataError` on a hash mismatch.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    record = dest.with_name(dest.name + ".sha256")
    expected = sha256 or (record.read_text(encoding="utf-8").strip() if record.is_file() else "")
    what = "expected (data.ibug300w.sha256)" if sha256 else f"recorded in {record}"
    if dest.is_file():
        digest = file_sha256(dest)
        if expected and digest != expected:
            raise DataError(f"{dest}: SHA-256 {digest} does not match the {what} {expected}; "
                            f"delete {dest} to download it again")
        _record_hash(record, digest, sha256)
        return digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            digest = _stream(url, part, timeout_s, progress)
            break
        except _Interrupted as exc:
            if attempt == attempts:
                raise DownloadError(f"{url}: download interrupted ({exc}) after {attempts} attempts; "
                                    f"{part.stat().st_size} bytes kept in {part}, rerun to resume") from None
            log.warning("%s: download interrupted (%s), resuming (attempt %d of %d)", url, exc, attempt + 1,
                        attempts)
    if expected and digest != expected:
        rejected = dest.with_name(dest.name + ".rejected")
        os.replace(part, rejected)  # a rerun starts afresh instead of resuming bad bytes
        raise DataError(f"{url}: downloaded file has SHA-256 {digest} but the {what} is {expected}; "
                        f"refusing it ({dest} not written; the download was moved to {rejected} for inspection)")
    os.replace(part, dest)
    _record_hash(record, digest, sha256)
    log.info("%s: %d bytes, sha256 %s", dest, dest.stat().st_size, digest)
    return digest


class _Interrupted(Exception):
    """The transfer stopped mid-stream (resumable)."""


def _record_hash(record: Path, digest: str, given: str) -> None:
    if not given and not record.is_file():
        atomic_write_text(record, digest + "\n")
        log.info("recorded SHA-256 %s in %s", digest, record)


def _open(url: str, offset: int, timeout_s: float):
    """Open ``url`` (asking for bytes from ``offset`` on); offline-type failures raise :class:`DownloadError`."""
    req = urllib.request.Request(url, headers={"User-Agent": "facemarks"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout_s)  # noqa: S310 (URL comes from params, scheme checked)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return exc  # range not satisfiable: the caller inspects Content-Range
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}. {OFFLINE_HINT}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} ({reason}). {OFFLINE_HINT}") from None


def _stream(url: str, part: Path, timeout_s: float, progress: bool | None) -> str:
    """Append the rest of ``url`` to ``part``; returns the digest of the complete file."""
    offset = part.stat().st_size if part.is_file() else 0
    resp = _open(url, offset, timeout_s)
    status = getattr(resp, "status", None) or 200
    h = hashlib.sha256()
    with resp:
        if status == 416:
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == offset:
                return file_sha256(part)
            part.unlink()
            return _stream(url, part, timeout_s, progress)
        if status == 206 and _content_range_start(resp.headers.get("Content-Range", "")) == offset:
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    h.update(chunk)
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignored the range request, starting over", url)
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        done = offset
        with open(part, mode) as f, _Progress(part.name, total, offset, progress) as bar:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    raise _Interrupted(f"{type(exc).__name__} at byte {done}") from None
                if not chunk:
                    break
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        if total is not None and done != total:
            raise _Interrupted(f"connection closed at byte {done} of {total}")
    return h.hexdigest()


def _content_range_start(value: str) -> int | None:
    """``'bytes 100-199/200'`` → 100."""
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str) -> int | None:
    """``'bytes */200'`` or ``'bytes 0-9/200'`` → 200."""
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


class _Progress:
    """tqdm bar on a terminal, else a log line (bytes, %, MB/s, ETA) every ``every_s`` seconds."""

    def __init__(self, name: str, total: int | None, initial: int, enabled: bool | None, every_s: float = 5.0):
        self.name, self.total, self.done, self.every_s = name, total, initial, every_s
        self.enabled = enabled is not False
        self.bar = None
        self.t0 = self.last = time.monotonic()
        self.start = initial
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name)

    def __enter__(self) -> "_Progress":
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            return (f"{self.name}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                    f"({100 * self.done / self.total:.0f}%), {rate / 1e6:.1f} MB/s, ETA {eta:.0f} s")
        return f"{self.name}: {self.done / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s"

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ extraction
def safe_extract(tar_path: Path, dest: Path) -> list[str]:
    """Extract ``tar_path`` into ``dest``, refusing any member that could land outside ``dest``.

    Every member is checked before anything is written: absolute names, ``..`` components, symlinks or
    hardlinks pointing outside ``dest``, and devices/FIFOs raise :class:`DataError` naming the member. The
    extraction itself also uses tarfile's ``filter="data"``. Returns the member names.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, root, tar_path)
            tar.extractall(root, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise DataError(f"{tar_path}: unsafe archive member refused by tarfile ({exc})") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{tar_path}: cannot extract ({type(exc).__name__}: {exc}); delete it to download again") \
            from None
    return [m.name for m in members]


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _check_member(m: tarfile.TarInfo, root: Path, tar_path: Path) -> None:
    name = m.name
    bad = f"{tar_path}: refusing archive member {name!r}"
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{bad}: absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DataError(f"{bad}: '..' escapes the target folder")
    target = Path(os.path.normpath(root / name))
    if not _inside(root, target):
        raise DataError(f"{bad}: resolves outside the target folder")
    if m.issym() or m.islnk():
        link = m.linkname
        if link.startswith("/") or PurePosixPath(link).is_absolute():
            raise DataError(f"{bad}: link to absolute path {link!r}")
        base = target.parent if m.issym() else root
        if not _inside(root, Path(os.path.normpath(base / link))):
            raise DataError(f"{bad}: link to {link!r} points outside the target folder")
    elif not (m.isfile() or m.isdir()):
        raise DataError(f"{bad}: special file (device or FIFO)")


__all__ = ["DownloadError", "fetch", "download", "safe_extract",
           "validate_records", "face_problem", "file_sha256", "fetch_ibug_archive"]
