"""Is the job's output directory on storage that every Ray node sees?

On a multi-node cluster the stages of a job run on different nodes: Ray Train
workers write checkpoints, the relabel and generation actors read them back,
and the driver persists the randomized-response labels that every later stage
(and every re-run) must read byte for byte. A directory on a node's local disk
breaks that silently: each node sees its own, different copy. So before any
training starts, :func:`check_shared_storage` refuses an output directory that
is not on a network filesystem when the connected cluster has more than one
alive node.

Detection reads ``/proc/mounts`` and takes the mount with the longest prefix of
the resolved path; its filesystem type decides (NFS/EFS/Filestore, SMB/CIFS,
FUSE mounts such as gcsfuse or s3fs, Lustre, GPFS, BeeGFS, CephFS, ...). A
shared filesystem that is not detected can be declared with
``PROPS_RAY_SHARED_STORAGE=1``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from props_ray.errors import UserError

SHARED_ENV = "PROPS_RAY_SHARED_STORAGE"
MOUNTS_FILE = "/proc/mounts"

# Filesystem types (the third field of /proc/mounts) whose contents every client sees.
# EFS and Filestore show up as nfs4; Azure Files as cifs/smb3; "fuse.*" covers gcsfuse,
# s3fs, mountpoint-s3, juicefs, sshfs, ...
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs3", "nfs4", "efs", "cifs", "smb", "smb2", "smb3", "smbfs", "lustre", "gpfs", "beegfs",
    "ceph", "cephfs", "glusterfs", "ocfs2", "gfs2", "wekafs", "panfs", "quobyte", "orangefs", "pvfs2",
    "afs", "davfs", "fuse.gcsfuse", "fuse.s3fs",
})
NETWORK_FS_PREFIXES = ("fuse.",)

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(UserError, ValueError):
    """Job storage that the cluster cannot use (named in the message)."""


@dataclass(frozen=True)
class Mount:
    device: str
    mount_point: str
    fs_type: str


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(mounts_file: str | os.PathLike = MOUNTS_FILE) -> list[Mount]:
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def mount_for(path: str | os.PathLike, mounts: list[Mount]) -> Mount | None:
    """The mount holding ``path``: the longest mount point that is a prefix of it (the last one wins on ties,
    as later mounts shadow earlier ones)."""
    p = os.path.realpath(os.path.abspath(os.fspath(path)))
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if mp == "/" or p == mp or p.startswith(mp + "/"):
            if best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/"):
                best = m
    return best


def is_network_fs(fs_type: str) -> bool:
    t = fs_type.lower()
    return t in NETWORK_FS_TYPES or t.startswith(NETWORK_FS_PREFIXES)


def _override() -> bool:
    return os.environ.get(SHARED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _alive_nodes() -> int:
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_storage(output_dir: str, *, num_nodes: int | None = None,
                         mounts_file: str | os.PathLike = MOUNTS_FILE) -> None:
    """Raise ``ValueError`` when ``output_dir`` cannot be shared by the nodes of the connected Ray cluster.

    - a URI (``s3://``, ``gs://``, ...) is always an error: the pipeline writes with local file I/O;
    - one alive node (or Ray not initialized): anything local is fine;
    - more than one alive node: the path must be on a network filesystem (from ``/proc/mounts``), or
      ``PROPS_RAY_SHARED_STORAGE=1`` must declare it shared.

    ``num_nodes`` and ``mounts_file`` exist for tests; by default the alive nodes come from ``ray.nodes()``.
    """
    text = str(output_dir)
    m = _URI.match(text)
    if m and m.group(1).lower() != "file":
        raise StorageError(
            f"output_dir {text!r} is a {m.group(1)}:// URI, which props-ray does not support yet: checkpoints, "
            f"privatized labels and the reference cache are written with local file I/O. Mount the bucket or "
            f"share at the same path on every node (e.g. gcsfuse, mountpoint-s3, or a network filesystem such as "
            f"NFS/EFS/Filestore) and set output_dir to that path, e.g. --set output_dir=/mnt/shared/runs")
    if m:  # file:///abs/path
        text = text[len("file://"):]
    nodes = _alive_nodes() if num_nodes is None else num_nodes
    if nodes <= 1 or _override():
        return
    resolved = os.path.realpath(os.path.abspath(text))
    mount = mount_for(resolved, read_mounts(mounts_file))
    if mount is not None and is_network_fs(mount.fs_type):
        return
    where = (f"it is on {mount.fs_type} ({mount.device} mounted at {mount.mount_point})" if mount
             else "its filesystem could not be determined from /proc/mounts")
    raise StorageError(
        f"output_dir {text!r} (resolved: {resolved}) is not on shared storage, but the Ray cluster has {nodes} alive "
        f"nodes: {where}, which is local to each node. Checkpoints and privatized labels are written by one node "
        f"and read by others, so output_dir must be on storage every node sees at the same path: a network mount "
        f"such as NFS/EFS/Filestore (or a ReadWriteMany volume on Kubernetes), e.g. "
        f"--set output_dir=/mnt/shared/runs. If this path is shared through a filesystem props-ray does not "
        f"detect, set {SHARED_ENV}=1.")
