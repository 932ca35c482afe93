"""CURVE key files: one key pair for the router (the client) and one for the shard groups (the server).

`mer-pipeline keys --out DIR` writes four files, each one z85 key (40 characters) and a newline:

    router.public  router.secret   <- the router's pair (0644 / 0600)
    shard.public   shard.secret    <- the shard groups' pair (0644 / 0600)

A shard group needs `shard.secret` (its own pair) and `router.public` (the client it admits); the
router needs `router.secret` and `shard.public` (the server it trusts). A public key may be shown to
anyone; a secret file readable by group or others is refused, as ssh refuses such a key. Loading
checks the length, the z85 alphabet and, where both halves are read, that the public key is the
secret's. Every error is a `KeyFileError` naming the file.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from mer.errors import KeyFileError

ROLES = ("router", "shard")
Z85_KEY_LENGTH = 40  # 32 bytes in z85
Z85_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
PUBLIC_MODE, SECRET_MODE = 0o644, 0o600


@dataclass(frozen=True)
class CurveKeyPair:
    """A CURVE key pair, each key as its 40 z85 bytes (what pyzmq's socket options take)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveKeyPair(public={self.public.decode()!r}, secret=<hidden>)"


def public_path(directory: str | Path, role: str) -> Path:
    return Path(directory) / f"{_checked_role(role)}.public"


def secret_path(directory: str | Path, role: str) -> Path:
    return Path(directory) / f"{_checked_role(role)}.secret"


def _checked_role(role: str) -> str:
    if role not in ROLES:
        raise KeyFileError(f"unknown key role {role!r}; the roles are {', '.join(ROLES)}")
    return role


# --- writing ----------------------------------------------------------------------------------------


def write_key_files(directory: str | Path, force: bool = False) -> list[Path]:
    """Make a fresh key pair per role and write the four files into `directory` (created if missing).

    Existing key files are refused, naming them, unless `force`; each file is written under a temporary
    name with its mode set and then renamed into place. Returns the paths written."""
    directory = Path(directory)
    targets = [(path, mode) for role in ROLES
               for path, mode in ((public_path(directory, role), PUBLIC_MODE), (secret_path(directory, role), SECRET_MODE))]
    existing = [str(path) for path, _ in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        raise KeyFileError(f"key files already exist: {', '.join(existing)} (use --force to replace them)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KeyFileError(f"{directory}: cannot create the key directory ({error.strerror or error})") from None
    contents = {}
    for role in ROLES:
        public, secret = zmq.curve_keypair()
        contents[public_path(directory, role)] = public
        contents[secret_path(directory, role)] = secret
    for path, mode in targets:
        _write_atomically(path, contents[path] + b"\n", mode)
    return [path for path, _ in targets]


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(descriptor, mode)  # exactly `mode`, whatever the umask
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise KeyFileError(f"{path}: cannot write the key file ({error.strerror or error})") from None


# --- reading ----------------------------------------------------------------------------------------


def read_key(path: str | Path, is_secret: bool) -> bytes:
    """The z85 key in `path` (40 bytes), checked; a secret must not be readable by group or others."""
    path = Path(path)
    kind = "secret" if is_secret else "public"
    try:
        info = path.stat()
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {kind} key file (make keys with `mer-pipeline keys --out DIR`)") from None
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read the {kind} key ({error.strerror or error})") from None
    if is_secret and info.st_mode & 0o077:
        raise KeyFileError(f"{path}: the secret key is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                           f"run chmod 600 {path}")
    try:
        key = text.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a z85 {kind} key (the file holds bytes that are not ASCII)") from None
    if len(key) != Z85_KEY_LENGTH:
        raise KeyFileError(f"{path}: a z85 {kind} key has {Z85_KEY_LENGTH} characters, this one {len(key)}")
    bad = sorted(set(key) - Z85_ALPHABET)
    if bad:
        raise KeyFileError(f"{path}: characters {''.join(bad)!r} are not in the z85 alphabet")
    try:
        z85.decode(key)
    except struct.error:  # a group of 5 characters above 2**32 - 1
        raise KeyFileError(f"{path}: not a z85 {kind} key (a group of 5 characters encodes more than 32 bits)") from None
    return key.encode("ascii")


def load_key_pair(directory: str | Path, role: str) -> CurveKeyPair:
    """The key pair of `role` ("router" or "shard") from `directory`, checked to belong together."""
    public_file, secret_file = public_path(directory, role), secret_path(directory, role)
    public, secret = read_key(public_file, is_secret=False), read_key(secret_file, is_secret=True)
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{public_file}: this public key is not the one of {secret_file} (make the pair again)")
    return CurveKeyPair(public, secret)


def load_public_key(directory: str | Path, role: str) -> bytes:
    """The public key of `role` from `directory` (the peer's key: its secret file need not be there)."""
    return read_key(public_path(directory, role), is_secret=False)
