"""Person groups: which images show the same person, and splits that keep every group on one side.

Frames of one person (video frames, a burst of photos) are near-duplicates: a split by file leaks them into
validation and test, and the epoch chosen by validation NME is then chosen on people the model has seen. A group
rule names each image's group from its file name: ``data.local.group``, a regular expression whose first group is
the person (``^(.+)_\\d+$``: ``Luis_Fonsi_21.jpg`` → ``Luis_Fonsi``), matched against the file name without folder
and suffix; the empty rule makes every file its own group (the split by file of before).

``download`` splits train / test by group and writes ``data/raw/groups.json`` (final record file → group) when a
rule is set; ``augment`` reads it back for the train / validation split (without it, every image its own group).
With one image per group, :func:`group_split` picks exactly the images the former per-image split picked, so the
default's bytes do not change.
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from facemarks.core.io import DataError

GROUPS_FILE = "groups.json"  # in data/raw: {"rule": pattern, "groups": {record file: group}}


def group_of(file: str, rule: re.Pattern | None, key: str = "data.local.group") -> str:
    """The group of ``file`` (a path; its name without suffix is matched): the rule's first group, or the file
    itself under the empty rule. A name the rule does not match is an error naming the file and ``key``."""
    if rule is None:
        return str(file)
    stem = PurePosixPath(str(file).replace("\\", "/")).stem
    m = rule.search(stem)
    if m is None or not m.group(1):
        raise DataError(f"{key} = {rule.pattern!r} does not match {stem!r} ({file}): every file name needs a "
                        "person group (or leave the key empty: every file its own group)")
    return m.group(1)


def split_seed(seed: int, purpose: str) -> int:
    """A 31-bit seed derived from ``base.seed`` and a purpose name (e.g. ``local-split``, the local train/test
    split), so that each split draws its own stream."""
    state = np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


def group_split(groups: Sequence[str], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the items that go to the held-out side (test or validation) — whole groups only.

    ``groups`` (N,) names each item's group. The groups, in order of first appearance, are permuted by ``rng``
    and taken in that order until at least ``round(N x fraction)`` items are held out (at least one item when
    ``fraction > 0``, and never every group). With one item per group this is ``rng.permutation(N)[:n]``.
    """
    groups = list(groups)
    n = len(groups)
    n_target = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_target = min(max(n_target, 1), n - 1)
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    members = list(order.values())
    held: list[int] = []
    if len(members) < 2:
        return np.zeros(0, np.int64)
    for k in rng.permutation(len(members)):
        if len(held) >= n_target:
            break
        if len(held) + len(members[k]) < n:  # a group that would leave nothing on the other side is passed over
            held += members[k]
    return np.sort(np.asarray(held, dtype=np.int64))


def summary(split_groups: dict[str, Sequence[str]]) -> dict:
    """``{"<split>": number of groups, ..., "overlap": groups on more than one side}`` for the metrics files."""
    sets = {name: set(g) for name, g in split_groups.items()}
    seen: dict[str, int] = {}
    for s in sets.values():
        for g in s:
            seen[g] = seen.get(g, 0) + 1
    return {**{name: len(s) for name, s in sets.items()}, "overlap": sum(1 for c in seen.values() if c > 1)}


def write_groups(raw_dir: Path, rule: str, groups: dict[str, str]) -> None:
    """``raw_dir/groups.json``: the rule and each record file's group (sorted, so the bytes follow the data)."""
    text = json.dumps({"rule": rule, "groups": dict(sorted(groups.items()))}, indent=1, sort_keys=True) + "\n"
    (Path(raw_dir) / GROUPS_FILE).write_text(text, encoding="utf-8")


def read_groups(raw_dir: Path) -> dict[str, str] | None:
    """The record file → group map of ``raw_dir/groups.json``, or ``None`` where download wrote none."""
    path = Path(raw_dir) / GROUPS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("groups"), dict):
        raise DataError(f"{path}: not a groups file (expected {{'rule': ..., 'groups': {{file: group}}}})")
    return {str(k): str(v) for k, v in data["groups"].items()}
