"""Locations the cluster shares: a plain path (a filesystem every node mounts) or a URI that pyarrow
opens (``s3://bucket/prefix``, ``gs://``, ``abfs://``, ``hdfs://``, ``file:///``).

Ray Train resolves its ``storage_path`` with the same ``pyarrow.fs.FileSystem.from_uri``, so the
trajectory store and the checkpoints accept the same locations and credentials (for S3 the usual
``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

# URI scheme → the pyarrow filesystem that serves it
FILESYSTEMS = {"file": "LocalFileSystem", "s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem",
               "abfs": "AzureFileSystem", "abfss": "AzureFileSystem", "hdfs": "HadoopFileSystem",
               "viewfs": "HadoopFileSystem"}


_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*):[^/@\s]+@")
# a user name alone before the host is a token too (https://TOKEN@host, GitHub's and Hugging Face's form)
_TOKEN_USER = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:*]+@")
# query parameters that carry a secret: by name (AWS X-Amz-Signature/-Credential/-Security-Token, GCS
# X-Goog-Signature, access_key, secret_key, session_token, ...) and Azure SAS's signature, `sig`
_SECRET_PARAMETER = re.compile(r"(?i)(?P<head>[?&](?:[^=&\s]*(?:secret|token|password|passwd|key|signature|credential)"
                               r"[^=&\s]*|sig)=)[^&\s'\"]+")
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``text`` with the credentials in it replaced by ***: the password of ``user:password@``, a token standing
    alone before the host (``https://TOKEN@host``), the values of query parameters that name a secret, token,
    password, key, signature or credential (and Azure SAS's ``sig``), and bearer tokens."""
    text = _TOKEN_USER.sub(r"\g<head>***@", _USERINFO.sub(r"\g<head>:***@", text))
    return _BEARER.sub(r"\g<head>***", _SECRET_PARAMETER.sub(r"\g<head>***", text))


def scheme(location: str) -> str:
    """The URI scheme of ``location``; empty for a plain path."""
    return urlsplit(location).scheme if "://" in location else ""


def uri_problem(location: str) -> str | None:
    """Why pyarrow could not open ``location`` (checked without touching the network), or None."""
    kind = scheme(location)
    if not kind:
        return None
    if kind not in FILESYSTEMS:
        return f"unsupported URI scheme '{kind}://' in {location}: use a path or one of {sorted(FILESYSTEMS)}"
    if not hasattr(pafs, FILESYSTEMS[kind]):
        return f"this pyarrow was built without {FILESYSTEMS[kind]}, needed for {location}"
    if kind not in ("file", "hdfs", "viewfs") and not urlsplit(location).netloc:
        return f"{location} names no bucket or container"
    return None


def absolute(location: str) -> str:
    """A plain path made absolute, so every process resolves it alike; a URI unchanged."""
    return location if scheme(location) else str(Path(location).absolute())


def join(location: str, *names: str) -> str:
    """``location/name/...``; a URI keeps its query (``?endpoint_override=...``) at the end."""
    if not scheme(location):
        return str(Path(location, *names))
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *names])))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``location`` and the path on it; a plain path is on the local filesystem."""
    if not scheme(location):
        return pafs.LocalFileSystem(), absolute(location)
    return pafs.FileSystem.from_uri(location)


def unreachable(location: str, timeout_s: float = 30.0) -> str | None:
    """Why a small object cannot be written to, read back from and deleted under the URI ``location`` within
    ``timeout_s`` (a wrong endpoint, no credentials, a bucket that does not exist), or None. Without it a run
    would find out at its first checkpoint upload, after the teacher trained; a client that retries forever is
    given up on at ``timeout_s`` (its thread is left to the process's end)."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            filesystem, root = resolve(location)
            path = f"{root.rstrip('/')}/.lori-probe-{uuid.uuid4().hex}"
            write_whole(filesystem, path, b"lori-ray")
            if read_whole(filesystem, path) != b"lori-ray":
                raise OSError("read back other bytes than were written")
            filesystem.delete_file(path)
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 - any failure is the answer
            outcome.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name="lori-storage-probe")
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


TEMPORARY_SUFFIX = ".tmp"


def write_whole(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see all of it at ``path`` or nothing.

    An object store's PUT is atomic (and a multipart upload only appears once completed), and it has
    no directories; a file on a local or shared filesystem is written under a temporary name and
    renamed, in a directory created on demand.
    """
    if not isinstance(filesystem, pafs.LocalFileSystem):
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    directory, name = path.rsplit("/", 1)
    filesystem.create_dir(directory, recursive=True)
    temporary = f"{directory}/.{name}.{os.getpid()}{TEMPORARY_SUFFIX}"
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(data)
    filesystem.move(temporary, path)


def write_local(path: str | Path, text: str) -> None:
    """A local result file (config.yaml, results.md, ...) written whole: readers see the old or the new one."""
    write_whole(pafs.LocalFileSystem(), str(Path(path).absolute()), text.encode())


@contextmanager
def published_directory(directory: str | Path) -> Iterator[Path]:
    """A directory written under a temporary name and renamed into place whole when the block succeeds: a
    reader (or a rerun deciding what is finished) never sees half of it."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except OSError as error:  # a full disk: the half-written copy is removed, which frees what it took
        shutil.rmtree(staging, ignore_errors=True)
        earlier = "the earlier one there is untouched" if directory.exists() else "nothing is left there"
        raise OSError(error.errno, f"{directory} not published ({error.strerror or error}); its partial copy was "
                                   f"removed and {earlier}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def remove_temporaries(filesystem: pafs.FileSystem, directory: str) -> int:
    """Delete what writers killed mid-``write_whole`` left under ``directory``; call it once no writer is
    running. Returns how many files it removed."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return 0
    infos = filesystem.get_file_info(pafs.FileSelector(directory, recursive=True, allow_not_found=True))
    orphans = [info.path for info in infos if info.type == pafs.FileType.File
               and info.base_name.startswith(".") and info.base_name.endswith(TEMPORARY_SUFFIX)]
    for path in orphans:
        filesystem.delete_file(path)
    return len(orphans)


def read_whole(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def is_file(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def list_files(filesystem: pafs.FileSystem, directory: str) -> list[str]:
    """Paths of the files directly in ``directory``, sorted; none when it does not exist."""
    infos = filesystem.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)
