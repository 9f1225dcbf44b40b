"""The journal of a sequential run: one safetensors file per batch in ``RUN/journal/``.

Each entry holds the batch's updates (``update.to_tensors``), the method state the batch changed,
and a JSON header (batch index, edits [start, end), case ids, seconds). An entry is written to a
temporary name, fsynced, renamed, and the directory fsynced, so a kill leaves either the whole
entry or none. A leftover temporary file or an unreadable last entry (a torn tail: the disk lost
what was not synced) is dropped with a warning; an unreadable entry before the last is an error.
An entry that reads but is not what editfast wrote (another header, a malformed update index,
foreign tensors, a missing batch) is an error wherever it is. ``load_run`` validates a whole run
(its config document, the model fingerprint, every update against the model) before any of it is
used.

Each entry carries a checksum (``sha256`` in its header: SHA-256 over its header, update index and
every tensor's name, dtype, shape and bytes), verified wherever a journal is read (``undo``,
``export``, ``eval --edits``, ``--resume``, the lm-eval bridge): an entry whose bytes changed after
editfast wrote it is an error naming the entry and its file. A journal written before checksums
existed (no entry has one) is accepted with one warning (once per process); a journal where some
entries have one and others not is refused (a checksum was removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editfast.core.errors import EditfastError
from editfast.core.paths import normal_permissions
from editfast.models.update import (
    Update,
    dumps_index,
    from_tensors,
    to_tensors,
    validate_updates,
)

FORMAT = "editfast-journal-1"
CHECKSUM = "sha256"  # the header key of an entry's checksum (see ``checksum``)
_UNVERIFIED_SAID: set[Path] = set()  # journals without checksums already warned about in this process
SESSION_FILE, RESULTS_FILE = "session.json", "results.json"


@dataclass
class Entry:
    batch: int
    start: int  # edits [start, end) of the run's request list
    end: int
    updates: list[Update]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "journal"

    def path(self, batch: int) -> Path:
        return self.dir / f"batch-{batch:06d}.safetensors"

    def exists(self) -> bool:
        return self.dir.is_dir() and any(self.dir.glob("batch-*.safetensors"))

    def append(self, entry: Entry) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors, index = to_tensors(entry.updates)
        tensors.update({f"state.{k}": v.detach().cpu().contiguous() for k, v in entry.state.items()})
        header = {"format": FORMAT, "batch": entry.batch, "start": entry.start, "end": entry.end, **entry.info}
        meta = {"entry": json.dumps(header, default=str), "updates": dumps_index(index)}
        meta[CHECKSUM] = checksum(meta, tensors)
        final = self.path(entry.batch)
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        normal_permissions(tmp)  # safetensors writes 0600
        os.replace(tmp, final)
        _fsync_dir(self.dir)

    def read(self) -> list[Entry]:
        """Entries in order; a torn tail is dropped."""
        if not self.dir.is_dir():
            return []
        for tmp in self.dir.glob(".batch-*.tmp"):
            warnings.warn(f"journal: dropping an unfinished entry {tmp.name} (the run was interrupted while writing it)",
                          RuntimeWarning, stacklevel=2)
            tmp.unlink(missing_ok=True)
        files = sorted(self.dir.glob("batch-*.safetensors"))
        out: list[Entry] = []
        unsummed: list[str] = []  # entries without a checksum (written before checksums existed)
        for i, f in enumerate(files):
            try:
                with safe_open(str(f), "pt") as st:  # one read: header, then the tensors
                    meta, tensors = st.metadata() or {}, {k: st.get_tensor(k) for k in st.keys()}
            except Exception as e:  # noqa: BLE001 (safetensors' own error type is not exported stably)
                if i == len(files) - 1:
                    warnings.warn(f"journal: the last entry {f.name} is torn ({e}); dropped, its batch runs again",
                                  RuntimeWarning, stacklevel=2)
                    try:
                        f.rename(f.with_name(f".{f.name}.torn"))
                    except OSError:
                        pass  # a read-only run: it is dropped again at the next read
                    break
                raise EditfastError(f"journal entry {f} is unreadable: {e}") from None
            try:
                entry = _entry(meta, tensors)
            except EditfastError as e:
                raise EditfastError(f"journal entry {f}: {e}") from None
            if CHECKSUM not in meta:
                unsummed.append(f.name)
            elif meta[CHECKSUM] != checksum(meta, tensors):
                raise EditfastError(f"journal entry {f} (batch {entry.batch}, edits {entry.start}..{entry.end - 1}) "
                                    "does not match its checksum: its bytes changed after editfast wrote it")
            if f.name != self.path(entry.batch).name:
                raise EditfastError(f"journal {self.dir}: entry {f.name} holds batch {entry.batch}, whose file is "
                                    f"{self.path(entry.batch).name} (renamed or out of place)")
            expect = (out[-1].batch + 1, out[-1].end) if out else (0, 0)
            if (entry.batch, entry.start) != expect:
                raise EditfastError(f"journal {self.dir}: entry {f.name} is batch {entry.batch} starting at edit "
                                    f"{entry.start}, expected batch {expect[0]} at edit {expect[1]} (a batch is "
                                    "missing or out of place)")
            out.append(entry)
        if unsummed and len(unsummed) < len(out):
            raise EditfastError(f"journal {self.dir}: entry {unsummed[0]} has no checksum while other entries have "
                                "one (it was removed or the entry replaced)")
        if unsummed and self.dir.resolve() not in _UNVERIFIED_SAID:
            _UNVERIFIED_SAID.add(self.dir.resolve())  # commands read a run twice (before and after the model loads)
            warnings.warn(f"journal {self.dir} was written before entries carried checksums: its {len(out)} "
                          "entries are not verified against changes on disk", RuntimeWarning, stacklevel=2)
        return out


def checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an entry: its header and update index as written, then every tensor (sorted by
    name) as its name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in ("entry", "updates"):
        h.update(f"{key}\0{meta.get(key, '')}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Entry:
    """An entry from a safetensors file's metadata and tensors; EditfastError if it is not editfast's."""
    if "entry" not in meta or "updates" not in meta:
        has = ", ".join(sorted(meta)) or "no metadata"
        raise EditfastError(f"not an editfast journal entry (its header has {has}, not 'entry' and 'updates')")
    try:
        header, index = json.loads(meta["entry"]), json.loads(meta["updates"])
    except ValueError as e:
        raise EditfastError(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise EditfastError(f"not an editfast journal entry (format {fmt!r}, expected {FORMAT!r})")
    b, start, end = (header.get(k) for k in ("batch", "start", "end"))
    if not (all(type(v) is int for v in (b, start, end)) and b >= 0 and 0 <= start < end):
        raise EditfastError(f"its header has no valid batch, start and end (got {b!r}, {start!r}, {end!r})")
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    updates = from_tensors({k: v for k, v in tensors.items() if not k.startswith("state.")}, index)
    info = {k: v for k, v in header.items() if k not in ("format", "batch", "start", "end")}
    return Entry(b, start, end, updates, state, info)


def write_entries(run_dir: str | Path, entries: Sequence[Entry]) -> None:
    """Write a whole journal (an in-memory run saved at the end, or the first k batches of ``undo``)."""
    j = Journal(run_dir)
    for f in j.dir.glob("batch-*.safetensors"):
        f.unlink()
    for e in entries:
        j.append(e)


def load_run(run_dir: str | Path, lm=None) -> tuple[dict[str, Any], list[Entry]]:
    """The config and journal entries of an ``editfast edit`` run directory, validated whole: the
    config document, and with ``lm`` the model fingerprint and every update against the model
    (``validate_updates``), so a bad run is refused before anything is applied or evaluated."""
    run = Path(run_dir)
    doc_file = run / SESSION_FILE
    if not doc_file.is_file() and (run / RESULTS_FILE).is_file():
        doc_file = run / RESULTS_FILE  # an older run: results.json holds the config
    if not doc_file.is_file():
        raise EditfastError(f"{run} is not an edit run directory (needs {SESSION_FILE} and journal/)")
    try:
        doc = json.loads(doc_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EditfastError(f"cannot read edit run {doc_file}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        got = "an object without one" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise EditfastError(f"{doc_file} is not an edit run's document (expected an object with a 'config' object, "
                            f"got {got})")
    config = doc["config"]
    config["_hparams"] = doc.get("hparams")
    config["_templates"] = doc.get("templates") or doc.get("context_templates")
    if lm is not None and config.get("model_fingerprint") != lm.weights_fingerprint:  # edited since loading: not it
        raise EditfastError(f"edit run {run} was made on model {config.get('model')!r} "
                            f"(fingerprint {str(config.get('model_fingerprint'))[:12]}), not on {lm.spec!r} "
                            f"({'edited since loading, weights' if lm.edited else 'fingerprint'} "
                            f"{lm.weights_fingerprint[:12]})")
    entries = Journal(run).read()
    if not entries:
        raise EditfastError(f"{run} holds no journal entries")
    if lm is not None:
        for e in entries:
            try:
                validate_updates(lm, e.updates)
            except EditfastError as err:
                raise EditfastError(f"edit run {run}, batch {e.batch} (edits {e.start}..{e.end - 1}): {err}") from None
    return config, entries
