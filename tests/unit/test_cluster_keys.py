"""CURVE key files: `mer-pipeline keys` writes two pairs with the right modes, refuses to overwrite
without --force, and the loader refuses bad files naming them."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from mer.cli.main import main
from mer.cluster.keys import load_key_pair, load_public_key, public_path, read_key, secret_path, write_key_files
from mer.errors import KeyFileError

NAMES = ["router.public", "router.secret", "shard.public", "shard.secret"]


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_command_writes_two_pairs_with_their_modes(tmp_path, capsys):
    out = tmp_path / "made" / "keys"
    assert main(["keys", "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == NAMES
    for role in ("router", "shard"):
        assert mode_of(public_path(out, role)) == 0o644
        assert mode_of(secret_path(out, role)) == 0o600
        pair = load_key_pair(out, role)
        assert len(pair.public) == len(pair.secret) == 40
        assert zmq.curve_public(pair.secret) == pair.public
        assert public_path(out, role).read_bytes() == pair.public + b"\n"
        assert pair.secret.decode() not in repr(pair)
    assert load_key_pair(out, "router") != load_key_pair(out, "shard")
    assert capsys.readouterr().out == ""  # human output on stderr only


def test_modes_hold_whatever_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        write_key_files(tmp_path)
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "shard.public") == 0o644 and mode_of(tmp_path / "shard.secret") == 0o600


def test_existing_keys_are_refused_unless_forced(tmp_path, capsys):
    write_key_files(tmp_path)
    before = load_key_pair(tmp_path, "shard")
    assert main(["keys", "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'router.public'}" in error and "--force" in error
    assert load_key_pair(tmp_path, "shard") == before
    (tmp_path / "router.public").unlink()
    (tmp_path / "router.secret").unlink()
    with pytest.raises(KeyFileError, match=r"shard\.public, .*shard\.secret"):  # one file left is enough to refuse
        write_key_files(tmp_path)
    assert main(["keys", "--out", str(tmp_path), "--force"]) == 0
    assert load_key_pair(tmp_path, "shard") != before
    assert sorted(path.name for path in tmp_path.iterdir()) == NAMES  # no temporary file left


def test_out_that_is_a_file_is_an_error_naming_it(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["keys", "--out", str(blocker / "keys")]) == 1
    assert str(blocker / "keys") in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "40 characters, this one 0"),
    (b"abc\n", "40 characters, this one 3"),
    (b"a" * 41, "40 characters, this one 41"),
    (b"a" * 39 + b"~", r"characters '~' are not in the z85 alphabet"),
    (b"a" * 38 + b" ,", r"characters ' ,' are not in the z85 alphabet"),
    (b"#" * 40, "encodes more than 32 bits"),
    (b"\xff" * 40, "not ASCII"),
])
def test_malformed_keys_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "router.public"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message) as raised:
        read_key(path, is_secret=False)
    assert str(path) in str(raised.value)


def test_a_missing_key_file_is_named(tmp_path):
    with pytest.raises(KeyFileError, match=rf"{tmp_path / 'shard.public'}: no such public key file.*mer-pipeline keys"):
        load_public_key(tmp_path, "shard")


def test_a_secret_readable_by_others_is_refused(tmp_path):
    write_key_files(tmp_path)
    os.chmod(tmp_path / "router.secret", 0o640)
    with pytest.raises(KeyFileError, match=r"router\.secret: the secret key is readable by others \(mode 0640\)"):
        load_key_pair(tmp_path, "router")


def test_a_public_key_of_another_pair_is_refused(tmp_path):
    write_key_files(tmp_path)
    (tmp_path / "router.public").write_bytes((tmp_path / "shard.public").read_bytes())
    with pytest.raises(KeyFileError, match=r"router\.public: this public key is not the one of .*router\.secret"):
        load_key_pair(tmp_path, "router")


def test_unknown_role_is_refused(tmp_path):
    with pytest.raises(KeyFileError, match="unknown key role 'client'"):
        load_key_pair(tmp_path, "client")
