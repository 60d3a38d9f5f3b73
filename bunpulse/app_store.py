"""Where the `bunpulse apps` command reads and writes app records: the apps file today.

A store holds app records as the apps file spells them (plain dicts, apps.py's fields) and
offers `records()`, `get(id)`, `add(record)`, `replace(id, record)` and `delete(id)`; a
database store can slot in behind the same five. Every write is checked with apps.py's own
loader before it lands (one source of truth), and lands atomically: the servers re-read the
file in place (apps_reload.py) and must never see half of it.
"""
import json
import os
import tempfile

from .apps import _no_repeated_fields, parse_apps
from .config import ConfigError


class StoreError(Exception):
    """What the command cannot do (a duplicate, an unknown app, a file it cannot use): one
    line for the operator."""


class FileAppStore:
    def __init__(self, path, taken=()):
        """taken: the apps configured elsewhere (PUSHER_APP_*), whose id and keys no record of
        the file may reuse, as at start-up."""
        self.path = path
        self._taken = taken

    # ------------------------------------------------------------------------ reading

    def _load(self):
        """(records, wrapped): the file's list, and whether it was {"apps": [...]}."""
        if not os.path.exists(self.path):
            raise StoreError(f"{self.path}: no such apps file (create an empty one with: "
                             f"echo '[]' > {self.path})")
        try:
            with open(self.path, encoding="utf-8") as handle:
                raw = json.load(handle, object_pairs_hook=_no_repeated_fields)
        except ConfigError as exc:  # a field given twice: a rewrite would drop one unseen
            raise StoreError(f"{self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read it ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.path}: invalid JSON at line {exc.lineno}: {exc.msg}") \
                from None
        wrapped = isinstance(raw, dict) and "apps" in raw
        records = raw["apps"] if wrapped else raw
        self._check(records)  # a malformed file is refused before anything is changed
        return records, wrapped

    def _check(self, records):
        try:
            parse_apps(records, self.path, self._taken)
        except ConfigError as exc:
            raise StoreError(str(exc)) from None

    def records(self):
        return self._load()[0]

    def get(self, app_id):
        for record in self.records():
            if str(record["id"]) == str(app_id):
                return record
        raise StoreError(f"{self.path}: no app with the id {app_id!r}")

    # ------------------------------------------------------------------------ writing

    def add(self, record):
        records, wrapped = self._load()
        if any(str(r["id"]) == str(record["id"]) for r in records):
            raise StoreError(f"{self.path}: an app with the id {record['id']!r} exists already")
        self._write(records + [record], wrapped)

    def replace(self, app_id, record):
        records, wrapped = self._load()
        index = self._index(records, app_id)
        self._write(records[:index] + [record] + records[index + 1:], wrapped)

    def delete(self, app_id):
        records, wrapped = self._load()
        index = self._index(records, app_id)
        self._write(records[:index] + records[index + 1:], wrapped)

    def _index(self, records, app_id):
        for index, record in enumerate(records):
            if str(record["id"]) == str(app_id):
                return index
        raise StoreError(f"{self.path}: no app with the id {app_id!r}")

    def _write(self, records, wrapped):
        self._check(records)  # a duplicate key, a mistyped field: refused, the file untouched
        # Its write bits too: root may write any file, but one marked read-only is meant so.
        if not os.access(self.path, os.W_OK) or not os.stat(self.path).st_mode & 0o222:
            raise StoreError(f"{self.path}: the file is read-only")
        text = json.dumps({"apps": records} if wrapped else records, indent=2) + "\n"
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, temp = tempfile.mkstemp(prefix=".apps-", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write beside it in {folder} "
                             f"({exc.strerror})") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, os.stat(self.path).st_mode & 0o7777)  # mkstemp's is 0600
            # A rename: a server reading the file sees the old one or the new one, whole.
            os.replace(temp, self.path)
        except BaseException:
            os.unlink(temp)
            raise
        _fsync_folder(folder)  # the rename itself survives a crash


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
