"""Data sources: resumable checked download, safe extraction, the ibug300w / local / synthetic paths, bad data."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io as stdio
import logging
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from facemarks.core import landmarks
from facemarks.data import local, sources
from facemarks.core.io import DataError, Face, ImageRecord, read_dlib_xml, write_dlib_xml, write_image, write_pts
from facemarks.core.params import Data, Ibug300w, Local, Synthetic

RNG_SEED = 1234


# ================================================================================================ helpers
def face_points(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """``(68, 2)`` float points on an ellipse inside a ``w × h`` image, integer-valued like dlib's."""
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    cx, cy = w / 2 + rng.uniform(-3, 3), h / 2 + rng.uniform(-3, 3)
    return np.round(np.stack([cx + 0.3 * w * np.cos(t), cy + 0.3 * h * np.sin(t)], axis=1))


def make_images(folder: Path, n: int, seed: int = RNG_SEED, size: tuple[int, int] = (40, 48),
                suffix: str = ".png") -> list[ImageRecord]:
    """Write ``n`` random images under ``folder`` with one face each; records' ``file`` relative to ``folder``."""
    rng = np.random.default_rng(seed)
    h, w = size
    records = []
    for i in range(n):
        name = f"img{i:02d}{suffix}"
        write_image(folder / name, rng.integers(0, 255, (h, w), dtype=np.uint8))
        pts = face_points(rng, w, h)
        box = (float(pts[:, 0].min() - 2), float(pts[:, 1].min() - 2), 30.0, 30.0)
        records.append(ImageRecord(file=name, faces=[Face(box=box, points=pts)]))
    return records


def local_data(path: Path, on_bad: str = "error", test_fraction: float = 0.25, **local: str) -> Data:
    return Data(source="local", on_bad=on_bad, local=Local(path=str(path), test_fraction=test_fraction, **local))


def xml_folder(tmp_path: Path, n_train: int = 4, n_test: int = 2) -> tuple[Path, list[ImageRecord]]:
    src = tmp_path / "src"
    records = make_images(src, n_train + n_test)
    write_dlib_xml(src / "my_train.xml", records[:n_train])
    write_dlib_xml(src / "my_test.xml", records[n_train:])
    return src, records


# ================================================================================================ HTTP server
class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path, honours ``Range: bytes=N-``; ``server.cut_after`` (a list) makes the
    next responses stop after that many bytes and drop the connection."""

    def do_GET(self):  # noqa: N802
        srv = self.server
        data = srv.payload
        start = 0
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut_after.pop(0) if srv.cut_after else None
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.payload = np.random.default_rng(RNG_SEED).bytes(300_000)
    srv.requests, srv.cut_after, srv.ranges = [], [], True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/archive.tar.gz"
    yield srv
    srv.shutdown()
    srv.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ================================================================================================ download
def test_download_resumes_after_a_cut_and_verifies_the_hash(server, tmp_path):
    server.cut_after = [100_000, 50_000]  # two cuts, then a full tail
    dest = tmp_path / "cache" / "archive.tar.gz"
    digest = sources.download(server.url, dest, sha256=sha(server.payload), progress=False)
    assert digest == sha(server.payload)
    assert dest.read_bytes() == server.payload
    assert server.requests == [None, "bytes=100000-", "bytes=150000-"]
    assert not dest.with_name(dest.name + ".part").exists()


def test_partial_file_from_an_earlier_run_is_resumed_and_hash_recorded(server, tmp_path):
    dest = tmp_path / "archive.tar.gz"
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(server.payload[:123_456])
    digest = sources.download(server.url, dest, progress=False)
    assert server.requests == ["bytes=123456-"]
    assert digest == sha(server.payload) and dest.read_bytes() == server.payload
    assert dest.with_name(dest.name + ".sha256").read_text().strip() == digest
    # A second call finds the verified file and does not touch the network.
    assert sources.download(server.url, dest, progress=False) == digest
    assert len(server.requests) == 1


def test_complete_part_left_by_a_killed_run_is_finished_without_refetching(server, tmp_path):
    dest = tmp_path / "archive.tar.gz"
    dest.with_name(dest.name + ".part").write_bytes(server.payload)  # killed after the last byte, before rename
    assert sources.download(server.url, dest, progress=False) == sha(server.payload)
    assert server.requests == [f"bytes={len(server.payload)}-"]  # answered 416: nothing left to send
    assert dest.read_bytes() == server.payload


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "archive.tar.gz"
    dest.with_name(dest.name + ".part").write_bytes(b"stale bytes that must not survive")
    assert sources.download(server.url, dest, progress=False) == sha(server.payload)
    assert dest.read_bytes() == server.payload


def test_persistent_cuts_fail_with_resume_hint_and_keep_the_part(server, tmp_path):
    server.cut_after = [10_000] * 3
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(sources.DownloadError, match="rerun to resume"):
        sources.download(server.url, dest, progress=False, attempts=3)
    assert dest.with_name(dest.name + ".part").stat().st_size == 30_000
    assert sources.download(server.url, dest, progress=False) == sha(server.payload)  # the rerun resumes


def test_expected_hash_mismatch_is_refused_and_good_file_untouched(server, tmp_path):
    dest = tmp_path / "archive.tar.gz"
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        sources.download(server.url, dest, sha256=wrong, progress=False)
    assert wrong in str(err.value) and sha(server.payload) in str(err.value)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    assert dest.with_name(dest.name + ".rejected").read_bytes() == server.payload
    # A verified file in place is kept when a refetch would not match.
    dest.write_bytes(b"the good archive")
    with pytest.raises(DataError, match=sha(b"the good archive")):
        sources.download(server.url, dest, sha256=wrong, progress=False)
    assert dest.read_bytes() == b"the good archive"


def test_recorded_hash_mismatch_is_refused(server, tmp_path):
    dest = tmp_path / "archive.tar.gz"
    first = sources.download(server.url, dest, progress=False)
    dest.unlink()
    server.payload = server.payload[:-1] + b"X"  # the server now serves different bytes
    with pytest.raises(DataError) as err:
        sources.download(server.url, dest, progress=False)
    msg = str(err.value)
    assert first in msg and sha(server.payload) in msg and "recorded in" in msg
    assert not dest.exists()


def test_offline_fails_fast_naming_the_offline_sources(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(sources.DownloadError) as err:
        sources.download(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path / "x.tar.gz", timeout_s=5, progress=False)
    assert time.monotonic() - t0 < 5
    assert "data.source: synthetic" in str(err.value) and "data.source: local" in str(err.value)
    assert isinstance(err.value, RuntimeError)


class NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_http_error_is_reported_with_the_offline_hint(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(sources.DownloadError, match="HTTP 404.*data.source: synthetic"):
            sources.download(f"http://127.0.0.1:{srv.server_address[1]}/x.tar.gz", tmp_path / "x.tar.gz",
                             progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    assert list(tmp_path.iterdir()) == []


def test_file_url_downloads(tmp_path):
    payload = np.random.default_rng(1).bytes(5_000)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    digest = sources.download(src.as_uri(), tmp_path / "out" / "dst.bin", progress=True)
    assert digest == sha(payload) and (tmp_path / "out" / "dst.bin").read_bytes() == payload
    with pytest.raises(sources.DownloadError, match="data.source: local"):
        sources.download((tmp_path / "missing.bin").as_uri(), tmp_path / "out" / "m.bin", progress=False)


def test_progress_line_has_percent_rate_and_eta():
    p = sources._Progress("x.tar.gz", total=2_000_000, initial=0, enabled=True, every_s=0)
    p.update(500_000)
    line = p.line()
    assert "25%" in line and "MB/s" in line and "ETA" in line


# ================================================================================================ extraction
def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, stdio.BytesIO(data) if info.isfile() else None)


@pytest.mark.parametrize("name,kw,why", [
    ("../evil.txt", {}, "'..'"),
    ("ok/../../evil.txt", {}, "'..'"),
    ("/tmp/evil-facemarks.txt", {}, "absolute"),
    ("link", {"type": tarfile.SYMTYPE, "linkname": "../../outside"}, "outside"),
    ("abslink", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "absolute"),
    ("hard", {"type": tarfile.LNKTYPE, "linkname": "../outside"}, "'..'|outside"),
    ("fifo", {"type": tarfile.FIFOTYPE}, "special"),
])
def test_safe_extract_refuses_escaping_members(tmp_path, name, kw, why):
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        add_member(tar, "good/first.txt", b"fine")
        add_member(tar, name, **kw)
    dest = tmp_path / "a" / "dest"
    with pytest.raises(DataError, match=why) as err:
        sources.safe_extract(tar_path, dest)
    assert repr(name) in str(err.value) and str(tar_path) in str(err.value)
    written = sorted(p.name for p in tmp_path.rglob("*"))
    assert written == ["a", "dest", "evil.tar"]  # nothing extracted, nothing outside
    assert not Path("/tmp/evil-facemarks.txt").exists()


def test_safe_extract_keeps_inside_links(tmp_path):
    tar_path = tmp_path / "ok.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        add_member(tar, "d/a.txt", b"A")
        add_member(tar, "d/sub/link", type=tarfile.SYMTYPE, linkname="../a.txt")
    names = sources.safe_extract(tar_path, tmp_path / "out")
    assert names == ["d/a.txt", "d/sub/link"]
    assert (tmp_path / "out" / "d" / "sub" / "link").read_bytes() == b"A"


def test_truncated_archive_is_a_data_error(tmp_path):
    tar_path = tmp_path / "cut.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        add_member(tar, "big.bin", np.random.default_rng(0).bytes(200_000))
    tar_path.write_bytes(tar_path.read_bytes()[:5_000])
    with pytest.raises(DataError, match="cut.tar.gz"):
        sources.safe_extract(tar_path, tmp_path / "out")


# ================================================================================================ ibug300w
def fake_ibug_tarball(tmp_path: Path) -> Path:
    """A tiny archive laid out like dlib's: top folder, image subfolders, the two label lists."""
    top = tmp_path / "build" / "ibug_300W_large_face_landmark_dataset"
    recs = make_images(top / "helen" / "trainset", 3, size=(36, 40))
    for r in recs:
        r.file = f"helen/trainset/{r.file}"
    write_dlib_xml(top / "labels_ibug_300W_train.xml", recs[:2])
    write_dlib_xml(top / "labels_ibug_300W_test.xml", recs[2:])
    write_dlib_xml(top / "labels_ibug_300W.xml", recs)
    tar_path = tmp_path / "served" / "ibug_300W_large_face_landmark_dataset.tar.gz"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    return tar_path


def test_ibug300w_fetch_from_a_local_server(server, tmp_path, monkeypatch):
    tar_path = fake_ibug_tarball(tmp_path)
    server.payload = tar_path.read_bytes()
    monkeypatch.chdir(tmp_path)
    data = Data(source="ibug300w", ibug300w=Ibug300w(url=server.url, cache_dir="cache"))
    summary = sources.fetch(data, 0, Path("raw"), progress=False)
    assert summary["sha256"] == sha(server.payload) and summary["archive"] == "archive.tar.gz"
    assert (summary["n_train_images"], summary["n_test_images"], summary["n_skipped"]) == (2, 1, 0)
    train = read_dlib_xml(tmp_path / "raw" / "train.xml")
    assert [r.file for r in train] == [f"ibug_300W_large_face_landmark_dataset/helen/trainset/img{i:02d}.png"
                                       for i in range(2)]
    assert all((tmp_path / "raw" / r.file).is_file() for r in train)
    assert (tmp_path / "cache" / "archive.tar.gz.sha256").read_text().strip() == summary["sha256"]
    # Same archive again: no new request; a changed hash in params is refused before data/raw is touched.
    n_requests = len(server.requests)
    sources.fetch(data, 0, Path("raw"), progress=False)
    assert len(server.requests) == n_requests
    bad = dataclasses.replace(data, ibug300w=Ibug300w(url=server.url, cache_dir="cache", sha256="a" * 64))
    with pytest.raises(DataError, match="a" * 64):
        sources.fetch(bad, 0, Path("raw"), progress=False)
    assert read_dlib_xml(tmp_path / "raw" / "train.xml")[0].file == train[0].file


def test_ibug300w_file_url_and_missing_list(tmp_path, monkeypatch):
    tar_path = tmp_path / "no_lists.tar"
    with tarfile.open(tar_path, "w") as tar:
        add_member(tar, "top/readme.txt", b"no lists here")
    monkeypatch.chdir(tmp_path)
    data = Data(source="ibug300w", ibug300w=Ibug300w(url=tar_path.as_uri(), cache_dir="cache"))
    with pytest.raises(DataError, match="labels_ibug_300W_train.xml"):
        sources.fetch(data, 0, Path("raw"), progress=False)
    assert not (tmp_path / "raw").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]  # no half-written temp tree


# ================================================================================================ local: good data
def test_local_xml_pair(tmp_path):
    src, records = xml_folder(tmp_path)
    write_dlib_xml(src / "all_labels.xml", records)  # neither train nor test: ignored
    out = tmp_path / "raw"
    summary = sources.fetch(local_data(src), 0, out)
    assert (summary["n_train_images"], summary["n_test_images"]) == (4, 2)
    assert (summary["n_train_faces"], summary["n_test_faces"], summary["n_skipped"]) == (4, 2, 0)
    train, test = read_dlib_xml(out / "train.xml"), read_dlib_xml(out / "test.xml")
    assert [r.file for r in train] == [f"images/train/img{i:02d}.png" for i in range(4)]
    for rec, orig in zip(train + test, records):
        assert (out / rec.file).read_bytes() == (src / orig.file).read_bytes()
        np.testing.assert_array_equal(rec.faces[0].points, orig.faces[0].points)
        assert rec.faces[0].box == orig.faces[0].box


def test_local_pts_folder_converts_one_indexed_points(tmp_path):
    src = tmp_path / "pts"
    records = make_images(src / "sub", 5, suffix=".jpg")
    for rec in records:
        write_pts(src / "sub" / Path(rec.file).with_suffix(".pts"), rec.faces[0].points)
    # The file on disk is 1-indexed: a 0-indexed point (x, y) is written as (x + 1, y + 1).
    first = (src / "sub" / "img00.pts").read_text().split("{")[1].split()[:2]
    np.testing.assert_allclose([float(v) for v in first], records[0].faces[0].points[0] + 1)
    out = tmp_path / "raw"
    summary = sources.fetch(local_data(src, test_fraction=0.4, box="tight"), 3, out)
    assert (summary["n_train_images"], summary["n_test_images"]) == (3, 2)
    got = {Path(r.file).name: r for r in read_dlib_xml(out / "train.xml") + read_dlib_xml(out / "test.xml")}
    for rec in records:
        face = got[rec.file].faces[0]
        np.testing.assert_allclose(face.points, rec.faces[0].points, atol=1e-3)
        pts = rec.faces[0].points
        assert face.box == pytest.approx((pts[:, 0].min(), pts[:, 1].min(), np.ptp(pts[:, 0]) + 1,
                                          np.ptp(pts[:, 1]) + 1), abs=1e-3)
        assert face.in_box().all()
    # the default box rule of a points-only face: the training-box convention of the synthetic faces
    sources.fetch(local_data(src, test_fraction=0.4), 3, out)
    got = {Path(r.file).name: r for r in read_dlib_xml(out / "train.xml") + read_dlib_xml(out / "test.xml")}
    for rec in records:
        got_pts = got[rec.file].faces[0].points
        assert got[rec.file].faces[0].box == pytest.approx(landmarks.face_box(got_pts), abs=1e-3)


def test_single_list_split_is_seeded_and_deterministic(tmp_path):
    src = tmp_path / "one"
    write_dlib_xml(src / "labels.xml", make_images(src, 20))

    def split(seed, out):
        s = sources.fetch(local_data(src, test_fraction=0.25), seed, tmp_path / out)
        test = sorted(Path(r.file).name for r in read_dlib_xml(tmp_path / out / "test.xml"))
        return s, test

    s0, a = split(0, "a")
    _, b = split(0, "b")
    _, c = split(7, "c")
    assert (s0["n_train_images"], s0["n_test_images"]) == (15, 5)
    assert a == b and a != c
    assert (tmp_path / "a" / "train.xml").read_bytes() == (tmp_path / "b" / "train.xml").read_bytes()


def test_seeded_split_keeps_one_of_each():
    items = [(Path(f"/x/{i}.png"), ImageRecord(file=f"{i}.png")) for i in range(3)]
    s = local.seeded_split(items, 0.01, 0)
    assert len(s["test"]) == 1 and len(s["train"]) == 2
    s = local.seeded_split(items, 1.0, 0)
    assert len(s["test"]) == 2 and len(s["train"]) == 1


def test_local_errors_for_unusable_folders(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        sources.fetch(local_data(tmp_path / "nope"), 0, tmp_path / "raw")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dlib XML"):
        sources.fetch(local_data(tmp_path / "empty"), 0, tmp_path / "raw")
    src = tmp_path / "many"
    recs = make_images(src, 2)
    write_dlib_xml(src / "a.xml", recs[:1])
    write_dlib_xml(src / "b.xml", recs[1:])
    with pytest.raises(DataError, match="no \\*train\\*.xml"):
        sources.fetch(local_data(src), 0, tmp_path / "raw")


# ================================================================================================ local: bad data
def corrupt(case: str, src: Path, records: list[ImageRecord]) -> tuple[str, str]:
    """Damage one item of an XML-pair folder (``records[1]`` = train img01); returns (reason, file named)."""
    faces = records[1].faces
    if case == "truncated_image":
        data = (src / "img01.png").read_bytes()
        (src / "img01.png").write_bytes(data[: len(data) // 3])
        return "bad_image", "img01.png"
    if case == "not_an_image":
        (src / "img01.png").write_text("hello, I am text")
        return "bad_image", "img01.png"
    if case == "missing_image":
        (src / "img01.png").unlink()
        return "missing_image", "img01.png"
    if case == "wrong_point_count":
        faces[0].points[60:] = np.nan  # the writer omits NaN parts: 60 parts in the file
    elif case == "absurd_coordinates":
        faces[0].points[5] = (10_000, 20)
    elif case == "zero_area_box":
        faces[0].box = (3.0, 4.0, 0.0, 30.0)
    elif case == "duplicate":
        records[2] = ImageRecord(file=records[1].file, faces=[Face(box=faces[0].box, points=faces[0].points)])
    write_dlib_xml(src / "my_train.xml", records[:4])
    if case == "nan_coordinates":
        text = (src / "my_train.xml").read_text()
        x = int(records[1].faces[0].points[0, 0])
        marker = f"<part name='00' x='{x}'"
        i = text.index(marker, text.index("img01.png"))
        (src / "my_train.xml").write_text(text[:i] + "<part name='00' x='nan'" + text[i + len(marker):])
        return "nan_coordinates", "img01.png"
    return case, "img01.png"


BAD_CASES = ["truncated_image", "not_an_image", "missing_image", "wrong_point_count", "nan_coordinates",
             "absurd_coordinates", "zero_area_box", "duplicate"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_local_data_errors_naming_the_file(tmp_path, case):
    src, records = xml_folder(tmp_path)
    _, named = corrupt(case, src, records)
    out = tmp_path / "raw"
    with pytest.raises(DataError) as err:
        sources.fetch(local_data(src, on_bad="error"), 0, out)
    assert named in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_local_data_is_skipped_and_counted(tmp_path, case, caplog):
    src, records = xml_folder(tmp_path)
    reason, named = corrupt(case, src, records)
    out = tmp_path / "raw"
    with caplog.at_level(logging.WARNING, logger="facemarks.data.sources"):
        summary = sources.fetch(local_data(src, on_bad="skip"), 0, out)
    assert summary["skipped"] == {reason: 1} and summary["n_skipped"] == 1
    assert any(reason in r.message and named in r.message for r in caplog.records)
    train = read_dlib_xml(out / "train.xml")
    # 4 train faces less the bad one (for "duplicate": img02's row became a second copy of img01's face).
    assert sum(len(r.faces) for r in train) == 3
    assert summary["n_test_faces"] == 2
    # The surviving labels are exactly the originals (never a silently altered label).
    originals = {r.file: r.faces[0].points for r in records}
    for rec in train:
        np.testing.assert_array_equal(rec.faces[0].points, originals[Path(rec.file).name])


def test_malformed_xml_file_is_an_error_even_with_skip(tmp_path):
    src, _ = xml_folder(tmp_path)
    (src / "my_train.xml").write_text("<dataset><images><image file='img00.png'>")
    for on_bad in ("error", "skip"):
        with pytest.raises(DataError, match="my_train.xml"):
            sources.fetch(local_data(src, on_bad=on_bad), 0, tmp_path / "raw")


def test_bad_pts_files(tmp_path):
    src = tmp_path / "pts"
    records = make_images(src, 5)
    for rec in records:
        write_pts(src / Path(rec.file).with_suffix(".pts"), rec.faces[0].points)
    text = (src / "img01.pts").read_text().replace("n_points:  68", "n_points:  67")
    (src / "img01.pts").write_text(text.replace(text.split("{\n")[1].split("\n")[0] + "\n", "", 1))
    (src / "img02.pts").write_text((src / "img02.pts").read_text().replace("{\n", "{\nnan nan\n", 1)
                                   .replace("n_points:  68", "n_points:  69"))
    write_pts(src / "orphan.pts", records[0].faces[0].points)  # no image beside it
    with pytest.raises(DataError, match="img01.pts"):
        sources.fetch(local_data(src), 0, tmp_path / "raw")
    summary = sources.fetch(local_data(src, on_bad="skip", test_fraction=0.5), 0, tmp_path / "raw")
    assert summary["skipped"] == {"wrong_point_count": 2, "missing_image": 1}
    assert summary["n_train_images"] + summary["n_test_images"] == 3


def test_points_outside_box_and_image_are_kept_and_counted(tmp_path):
    src, records = xml_folder(tmp_path)
    records[0].faces[0].points[3] = (-5.0, 10.0)  # outside the 48-wide image and the box, but not absurd
    write_dlib_xml(src / "my_train.xml", records[:4])
    summary = sources.fetch(local_data(src), 0, tmp_path / "raw")
    assert summary["n_points_outside_image"] == 1
    assert summary["n_points_outside_box"] >= 1
    kept = read_dlib_xml(tmp_path / "raw" / "train.xml")[0].faces[0].points[3]
    np.testing.assert_array_equal(kept, (-5.0, 10.0))


def test_face_problem_bounds():
    pts = face_points(np.random.default_rng(0), 100, 80)
    assert sources.face_problem(Face((10, 10, 50, 50), pts), 100, 80) is None
    far = pts.copy()
    far[0] = (-100.6, 10)  # farther than one width left of the image's edge at -0.5
    assert sources.face_problem(Face((10, 10, 50, 50), far), 100, 80)[0] == "absurd_coordinates"
    far[0] = (-100.5, 10)
    assert sources.face_problem(Face((10, 10, 50, 50), far), 100, 80) is None
    far[0] = (10, 80 * 2 - 0.4)  # just past one height below the bottom edge
    assert sources.face_problem(Face((10, 10, 50, 50), far), 100, 80)[0] == "absurd_coordinates"
    far[0] = (10, 80 * 2 - 0.5)
    assert sources.face_problem(Face((10, 10, 50, 50), far), 100, 80) is None
    assert sources.face_problem(Face((10, 10, 50, -1), pts), 100, 80)[0] == "zero_area_box"
    assert sources.face_problem(Face((10, 10, 50, 50), pts[:60]), 100, 80)[0] == "wrong_point_count"


# ================================================================================================ atomicity
def test_failed_fetch_leaves_the_previous_output_whole(tmp_path, monkeypatch):
    src, _ = xml_folder(tmp_path)
    out = tmp_path / "raw"
    sources.fetch(local_data(src), 0, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure while writing")

    monkeypatch.setattr(sources, "write_dlib_xml", boom)
    with pytest.raises(RuntimeError, match="injected"):
        sources.fetch(local_data(src, test_fraction=0.5), 1, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]  # no temp tree left behind


# ================================================================================================ synthetic
def test_synthetic_source_writes_the_common_layout(tmp_path):
    cfg = Synthetic(n_train=3, n_test=2, min_size=64, max_size=80, workers=1)
    data = Data(source="synthetic", synthetic=cfg)
    a = sources.fetch(data, 5, tmp_path / "a")
    b = sources.fetch(data, 5, tmp_path / "b")
    assert a == b
    assert (a["n_train_images"], a["n_test_images"], a["n_skipped"]) == (3, 2, 0)
    train = read_dlib_xml(tmp_path / "a" / "train.xml")
    test = read_dlib_xml(tmp_path / "a" / "test.xml")
    assert all(r.file.startswith("images/train/") for r in train)
    assert all(r.file.startswith("images/test/") for r in test)
    for r in train + test:
        assert (tmp_path / "a" / r.file).read_bytes() == (tmp_path / "b" / r.file).read_bytes()
    assert (tmp_path / "a" / train[0].file).read_bytes() != (tmp_path / "a" / test[0].file).read_bytes()
