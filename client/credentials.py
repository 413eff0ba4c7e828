"""Credentials files (``.creds``, as NATS has): who a client is to a secure cluster, and how it knows the cluster.

Rules of this file:
- A credentials file is a small JSON object: ``principal`` (the name the cluster's ACLs know), ``public_key`` and
  ``secret_key`` (the principal's CURVE keypair, z85), ``server_key`` (the CURVE key of every node's client port,
  z85) and ``cluster``. Whoever holds it is that principal: it is written with mode 0600, and ``load`` refuses a
  file that others may read.
- The SDK finds it in the ``credentials`` argument or else in the environment variable ``SHARDMQ_CREDENTIALS``
  (``resolve``); with neither, or with ``credentials=False``, a client connects without CURVE, which only an
  ``--insecure`` cluster accepts.
- The cluster side (the principal's record in etcd, signed with the cluster key) is ``shard.security``'s;
  ``shardmq creds add`` writes both.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

CREDENTIALS_ENV = "SHARDMQ_CREDENTIALS"
_Z85_KEY_LENGTH = 40  # a 32-byte CURVE key in z85


class CredentialsError(ValueError):
    """A credentials file is missing, unreadable, readable by others or not one: says which and why."""


@dataclass(frozen=True, slots=True)
class Credentials:
    principal: str
    public_key: str
    secret_key: str
    server_key: str
    cluster: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Credentials:
        try:
            mode = os.stat(path).st_mode
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialsError(f"credentials file {path} may be read by others (mode {stat.S_IMODE(mode):o}): "
                                   f"chmod 600 {path}")  # fmt: skip
        try:
            data = orjson.loads(raw)
            creds = cls(str(data["principal"]), data["public_key"], data["secret_key"], data["server_key"],
                        str(data.get("cluster", "")))  # fmt: skip
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise CredentialsError(f"{path} is not a shardmq credentials file ({exc!r}); make one with "
                                   "`shardmq creds add NAME --dir DIR`") from None  # fmt: skip
        for name in ("public_key", "secret_key", "server_key"):
            key = getattr(creds, name)
            if not isinstance(key, str) or len(key) != _Z85_KEY_LENGTH:
                raise CredentialsError(f"{path}: {name} must be a CURVE key in z85 ({_Z85_KEY_LENGTH} characters)")
        return creds

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the file, readable by its owner only (replacing any file at ``path``)."""
        Path(path).unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2) + b"\n")


CredentialsArg = str | os.PathLike[str] | Credentials | bool | None


def resolve(credentials: CredentialsArg) -> Credentials | None:
    """The credentials a client uses: the argument, else (None) the file ``SHARDMQ_CREDENTIALS`` names, else none;
    ``False``: none, whatever the environment says (a client of an ``--insecure`` cluster)."""
    if isinstance(credentials, Credentials):
        return credentials
    if credentials is False:
        return None
    if credentials is True:
        raise CredentialsError("credentials=True names no file: pass a path, or None to use SHARDMQ_CREDENTIALS")
    if credentials is None:
        credentials = os.environ.get(CREDENTIALS_ENV) or None
    return None if credentials is None else Credentials.load(credentials)
