"""The run folder of a cluster run, wherever `--out` puts it: a local or NFS path, `file://`, `s3://` or `gs://`.

Nodes share no disk. Every file a node needs from another (the evaluation windows, a baseline's reference
log-probs, a variant's calibration, an artifact) goes through here, by relative path inside the run folder;
only those paths and small records travel through Ray. pyarrow.fs does the copying.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from compress.cluster import ClusterError


def inside(out: str, rel: str) -> str:
    """`rel` in the run folder `out`, a path or a URI whose options (an S3 endpoint's) stay at the end."""
    location, mark, options = out.partition("?")
    return f"{location.rstrip('/')}/{rel}{mark}{options}"


class StoreError(ClusterError):
    """`--out` names no file system pyarrow can open."""


class Store:
    def __init__(self, uri: str):
        from pyarrow import fs

        self.uri = str(uri)
        if "://" in self.uri:
            try:
                self.fs, root = fs.FileSystem.from_uri(self.uri)
            except (ValueError, OSError) as error:  # unknown scheme, no credentials, no such bucket
                raise StoreError(f"--out {self.uri}: {str(error).splitlines()[0]}") from None
        else:
            self.fs, root = fs.LocalFileSystem(), str(Path(self.uri).resolve())
        self.root = root.rstrip("/")
        self._local_fs = fs.LocalFileSystem()
        # A plain path: the driver works in the run folder itself (a URI, even file://, goes through copies).
        self.local = Path(self.root) if "://" not in self.uri else None

    def check_writable(self) -> None:
        """Write and delete a probe, so that a run folder nobody may write fails before any work, in one sentence."""
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            self.write_json(probe, {})
            self.delete(probe)
        except OSError as error:
            raise StoreError(f"--out {self.uri}: the run folder cannot be written ({str(error).splitlines()[0]})") from None

    def __reduce__(self):  # pyarrow file systems pickle, but a store is cheaper rebuilt from its URI on the node
        return (Store, (self.uri,))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/")

    def show(self, rel: str) -> str:
        """Where `rel` is, as the user named the run folder."""
        return str(self.local / rel) if self.local else inside(self.uri, rel)

    def _info(self, rel: str):
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self._info(rel).type != fs.FileType.NotFound

    def is_dir(self, rel: str) -> bool:
        from pyarrow import fs

        return self._info(rel).type == fs.FileType.Directory

    def files(self, rel: str) -> list[str]:
        """Every file under the folder `rel`, by path relative to it."""
        from pyarrow import fs

        if not self.is_dir(rel):
            return []
        selector = fs.FileSelector(self.path(rel), recursive=True)
        base = self.path(rel) + "/"
        return sorted(info.path.removeprefix(base) for info in self.fs.get_file_info(selector) if info.type == fs.FileType.File)

    def push(self, local: Path, rel: str) -> None:
        """Copy the local file or folder `local` to `rel`, replacing what was there."""
        from pyarrow import fs

        self.delete(rel)
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if local.is_dir():
            self.fs.create_dir(self.path(rel), recursive=True)
        fs.copy_files(str(local), self.path(rel), source_filesystem=self._local_fs, destination_filesystem=self.fs)

    def pull(self, rel: str, local: Path) -> bool:
        """Copy `rel` (a file or a folder) to `local`. -> False where the run folder has no `rel`."""
        from pyarrow import fs

        if not self.exists(rel):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        if self.is_dir(rel):
            local.mkdir(parents=True, exist_ok=True)
        fs.copy_files(self.path(rel), str(local), source_filesystem=self.fs, destination_filesystem=self._local_fs)
        return True

    def delete(self, rel: str) -> None:
        from pyarrow import fs

        kind = self._info(rel).type
        if kind == fs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif kind == fs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def move(self, source: str, destination: str) -> None:
        """A rename where the file system has one (local, NFS: atomic); else a copy, then the source deleted."""
        from pyarrow import fs

        self.fs.create_dir(self.path(destination).rsplit("/", 1)[0], recursive=True)
        try:
            self.fs.move(self.path(source), self.path(destination))
        except (OSError, NotImplementedError):  # object stores move files, not folders
            fs.copy_files(self.path(source), self.path(destination), source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(self.path(source))

    def read_json(self, rel: str) -> dict | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self.path(rel)) as stream:
            try:
                return json.loads(stream.read())
            except json.JSONDecodeError:
                return None

    def write_json(self, rel: str, data: dict) -> None:
        """Written beside, then moved over: a reader sees the old file or the new one whole."""
        temporary = f"{rel}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path(temporary)) as stream:
            stream.write((json.dumps(data, indent=2, default=str) + "\n").encode())
        self.fs.move(self.path(temporary), self.path(rel))

    def release(self, staging: str, destination: str, retired: str) -> None:
        """Move a verified staging folder to `destination`, an older release first moved out to `retired`, so the
        release folder never holds a stale or partial artifact beside the new one (compress.release, by store)."""
        if self.exists(destination):
            old = f"{retired}/{destination.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
            self.move(destination, old)
            self.move(staging, destination)
            self.delete(old)
        else:
            self.move(staging, destination)
