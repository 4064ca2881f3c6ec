"""AES-256-GCM block codec: round trips, tamper matrix, nonce uniqueness, key parsing without leaks."""

from __future__ import annotations

import base64
import mmap
import os
import pathlib
import pickle
import traceback
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncload._exceptions import AsyncloadError, BudgetError, FormatError, IntegrityError
from asyncload.codecs import _aead
from asyncload.codecs._aead import (
    MAX_ONESHOT,
    MAX_PLAINTEXT,
    TAG_BYTES,
    DecryptionError,
    Key,
    KeyFormatError,
    block_aad,
    block_nonce,
    cipher,
    decrypt_into,
    encrypt_into,
    key_from_env,
    key_from_file,
    key_from_hex,
    load_key,
    manifest_mac,
    new_data_key,
    resolve_key,
    table_digest,
    unwrap_data_key,
    verify_manifest_mac,
    wrap_data_key,
)

RNG = np.random.default_rng(1234)
CKPT = uuid.UUID(int=1).hex
DIGEST = table_digest(b'{"tensors": "canonical table"}')


def _random(n: int) -> bytes:
    return RNG.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _seal(dek: bytes, index: int, count: int, plaintext: bytes, ckpt: str = CKPT) -> bytearray:
    out = bytearray(len(plaintext) + TAG_BYTES)
    n = encrypt_into(dek, block_nonce(index), block_aad(ckpt, index, count, DIGEST), plaintext, out)
    assert n == len(out)
    return out


def _leaks(text: str, secret: bytes | str) -> bool:
    """True when text shows secret: raw repr, hex (either case), or any 12-char window of those."""
    forms = []
    if isinstance(secret, str):
        forms.append(secret.strip())
        secret = secret.strip().encode("latin-1", "replace")
    forms += [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]
    for form in forms:
        windows = [form] if len(form) < 12 else [form[i : i + 12] for i in range(len(form) - 11)]
        if any(w and w in text for w in windows):
            return True
    return False


def _exc_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("size", [0, 1, 4095, 65_537, 4 * 1024 * 1024])
def test_round_trip_byte_identical(size: int) -> None:
    dek = _aead.generate_data_key()
    plaintext = _random(size)
    sealed = _seal(dek, 3, 7, plaintext)
    assert len(sealed) == size + TAG_BYTES
    out = bytearray(b"\xaa" * size)
    got = decrypt_into(dek, block_nonce(3), block_aad(CKPT, 3, 7, DIGEST), memoryview(sealed), out, index=3)
    assert got == size
    assert bytes(out) == plaintext


def test_round_trip_in_place_and_into_ndarray_slot() -> None:
    aead = cipher(_aead.generate_data_key())
    plaintext = _random(100_003)
    slot = np.zeros(len(plaintext) + TAG_BYTES + 64, dtype=np.uint8)  # a ring slot larger than the block
    slot[: len(plaintext)] = np.frombuffer(plaintext, np.uint8)
    aad = block_aad(CKPT, 0, 1, DIGEST)
    view = memoryview(slot)
    n = encrypt_into(aead, block_nonce(0), aad, view[: len(plaintext)], view)  # in place
    assert n == len(plaintext) + TAG_BYTES
    assert slot[: len(plaintext)].tobytes() != plaintext
    m = decrypt_into(aead, block_nonce(0), aad, view[:n], view)  # in place again
    assert m == len(plaintext)
    assert slot[:m].tobytes() == plaintext


def test_multibyte_views_are_treated_as_bytes() -> None:
    dek = _aead.generate_data_key()
    arr = RNG.standard_normal((33, 17)).astype(np.float32)
    out = np.empty(arr.nbytes + TAG_BYTES, np.uint8)
    aad = block_aad(CKPT, 0, 1, DIGEST)
    assert encrypt_into(dek, block_nonce(0), aad, arr, out) == arr.nbytes + TAG_BYTES
    back = np.empty_like(arr)
    decrypt_into(dek, block_nonce(0), aad, out, back)
    np.testing.assert_array_equal(back, arr)


def test_ciphertext_holds_no_64_byte_run_of_plaintext() -> None:
    # Non-trivial plaintext with internal repetition (ECB-like modes would leak it).
    unit = _random(4096)
    plaintext = unit * 64 + _random(12345)
    sealed = bytes(_seal(_aead.generate_data_key(), 0, 1, plaintext))
    runs = {plaintext[i : i + 64] for i in range(0, len(plaintext) - 63, 8)}
    assert not any(sealed[i : i + 64] in runs for i in range(len(sealed) - 63))
    # also at odd alignments
    assert all(plaintext[i : i + 64] not in sealed for i in range(0, 4096, 61))


def test_encrypt_into_has_native_path() -> None:
    # Recent cryptography writes straight into slot memory (no extra copy); older ones use the fallback.
    if not _aead.HAS_INTO:
        pytest.skip("installed cryptography has no AESGCM.encrypt_into; the copying fallback is in use")
    assert hasattr(_aead.AESGCM, "decrypt_into")


def test_fallback_without_into_round_trips_and_zeroes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_aead, "HAS_INTO", False)
    dek = _aead.generate_data_key()
    plaintext = _random(5000)
    sealed = _seal(dek, 1, 2, plaintext)
    assert sealed == bytearray(
        _aead.AESGCM(dek).encrypt(block_nonce(1), plaintext, block_aad(CKPT, 1, 2, DIGEST))
    )
    out = bytearray(len(plaintext))
    decrypt_into(dek, block_nonce(1), block_aad(CKPT, 1, 2, DIGEST), sealed, out, index=1)
    assert bytes(out) == plaintext
    sealed[-1] ^= 1
    out[:] = b"\xaa" * len(out)
    with pytest.raises(DecryptionError, match="block 1"):
        decrypt_into(dek, block_nonce(1), block_aad(CKPT, 1, 2, DIGEST), sealed, out, index=1)
    assert out == bytearray(len(out))


# ------------------------------------------------------------------------------------ tamper matrix


def _tamper_cases() -> list[tuple[str, dict[str, object]]]:
    return [
        ("wrong_index_in_nonce", {"nonce": block_nonce(4)}),
        ("nonce_bit_flip", {"nonce_flip": True}),
        ("ciphertext_bit_flip", {"flip": 100}),
        ("ciphertext_first_byte", {"flip": 0}),
        ("tag_bit_flip", {"flip": -1}),
        ("tag_first_byte", {"flip": -TAG_BYTES}),
        ("aad_other_checkpoint", {"aad": block_aad(uuid.UUID(int=2).hex, 3, 7, DIGEST)}),
        ("aad_other_index", {"aad": block_aad(CKPT, 4, 7, DIGEST)}),
        ("aad_other_count", {"aad": block_aad(CKPT, 3, 6, DIGEST)}),
        ("aad_other_table", {"aad": block_aad(CKPT, 3, 7, table_digest(b"other table"))}),
        ("wrong_data_key", {"dek": os.urandom(32)}),
        ("truncated_by_one", {"truncate": 1}),
        ("truncated_tag_only", {"truncate": 200}),  # leaves only part of the ciphertext, tag gone
        ("truncated_below_tag", {"keep": 7}),
        ("extended", {"extend": b"\x00"}),
    ]


@pytest.mark.parametrize("case", [c[1] for c in _tamper_cases()], ids=[c[0] for c in _tamper_cases()])
def test_tamper_matrix_rejects_and_zeroes_out(case: dict[str, object]) -> None:
    dek = _aead.generate_data_key()
    plaintext = _random(1000)
    sealed = _seal(dek, 3, 7, plaintext)
    nonce = bytearray(case.get("nonce", block_nonce(3)))  # type: ignore[arg-type]
    if case.get("nonce_flip"):
        nonce[-1] ^= 0x01
    aad = case.get("aad", block_aad(CKPT, 3, 7, DIGEST))
    if "flip" in case:
        sealed[case["flip"]] ^= 0x80  # type: ignore[index]
    if "truncate" in case:
        del sealed[len(sealed) - case["truncate"] :]  # type: ignore[operator]
    if "keep" in case:
        del sealed[case["keep"] :]  # type: ignore[misc]
    if "extend" in case:
        sealed += case["extend"]  # type: ignore[operator]
    out = bytearray(b"\xaa" * (len(plaintext) + 8))
    use_dek = case.get("dek", dek)
    with pytest.raises(DecryptionError, match="block 3") as info:
        decrypt_into(use_dek, bytes(nonce), aad, sealed, out, index=3)  # type: ignore[arg-type]
    assert info.value.index == 3
    assert isinstance(info.value, IntegrityError)
    assert out == bytearray(len(out)), "unauthenticated bytes left in out"


def test_swapped_blocks_fail() -> None:
    dek = _aead.generate_data_key()
    blocks = [_random(512) for _ in range(3)]
    sealed = [_seal(dek, i, 3, b) for i, b in enumerate(blocks)]
    out = bytearray(512)
    # block 1's bytes presented at position 2
    with pytest.raises(DecryptionError, match="block 2"):
        decrypt_into(dek, block_nonce(2), block_aad(CKPT, 2, 3, DIGEST), sealed[1], out, index=2)
    assert out == bytearray(512)
    # and the honest order still works
    for i in range(3):
        decrypt_into(dek, block_nonce(i), block_aad(CKPT, i, 3, DIGEST), sealed[i], out, index=i)
        assert bytes(out) == blocks[i]


def test_decrypt_failure_without_index_still_clear() -> None:
    dek = _aead.generate_data_key()
    sealed = _seal(dek, 0, 1, b"x" * 64)
    sealed[5] ^= 1
    with pytest.raises(DecryptionError, match="authentication failed") as info:
        decrypt_into(dek, block_nonce(0), block_aad(CKPT, 0, 1, DIGEST), sealed, bytearray(64))
    assert info.value.index is None


def test_size_limits_rejected_clearly() -> None:
    dek = _aead.generate_data_key()
    aad = block_aad(CKPT, 0, 1, DIGEST)
    # Anonymous mappings are lazily backed: nothing here touches 2 GiB of memory.
    with mmap.mmap(-1, MAX_PLAINTEXT + 1) as big:
        view = memoryview(big)
        with pytest.raises(BudgetError, match="at most 2147483631 bytes of plaintext"):
            encrypt_into(dek, block_nonce(0), aad, view, bytearray(16))
        view.release()
    assert MAX_PLAINTEXT + TAG_BYTES == MAX_ONESHOT
    with mmap.mmap(-1, MAX_ONESHOT + 1) as big:
        view = memoryview(big)
        with pytest.raises(BudgetError, match="at most 2147483647 bytes"):
            decrypt_into(dek, block_nonce(0), aad, view, bytearray(16))
        view.release()
    with pytest.raises(BudgetError, match="needs 26"):
        encrypt_into(dek, block_nonce(0), aad, b"0123456789", bytearray(25))
    with pytest.raises(TypeError, match="writable"):
        encrypt_into(dek, block_nonce(0), aad, b"0123456789", bytes(26))


def test_bad_data_key_and_aad_arguments() -> None:
    with pytest.raises(KeyFormatError):
        encrypt_into(b"short", block_nonce(0), b"", b"", bytearray(16))
    with pytest.raises(ValueError):
        block_aad(CKPT, 7, 7, DIGEST)
    with pytest.raises(ValueError):
        block_aad(CKPT, 0, 1, b"not a digest")
    with pytest.raises(ValueError):
        block_nonce(2**64)
    with pytest.raises(ValueError):
        block_nonce(-1)


# ------------------------------------------------------------------------------------ envelope


def test_wrap_unwrap_and_rekey() -> None:
    old, new = Key(os.urandom(32)), Key(os.urandom(32))
    dek, env = new_data_key(old, CKPT)
    assert set(env) == {"scheme", "nonce", "wrapped"} and all(isinstance(v, str) for v in env.values())
    assert not _leaks(repr(env), dek)
    assert unwrap_data_key(old, env, CKPT) == dek
    rekeyed = wrap_data_key(new, unwrap_data_key(old, env, CKPT), CKPT)
    assert unwrap_data_key(new, rekeyed, CKPT) == dek
    with pytest.raises(DecryptionError, match="wrong key or tampered key envelope"):
        unwrap_data_key(old, rekeyed, CKPT)
    with pytest.raises(DecryptionError, match="wrong key or tampered key envelope"):
        unwrap_data_key(new, env, CKPT)


def test_unwrap_rejects_other_checkpoint_and_tampering() -> None:
    key = Key(os.urandom(32))
    _, env = new_data_key(key, CKPT)
    with pytest.raises(DecryptionError, match="wrong key or tampered key envelope"):
        unwrap_data_key(key, env, uuid.UUID(int=9).hex)
    for field in ("nonce", "wrapped"):
        raw = bytearray(base64.b64decode(env[field]))
        raw[0] ^= 1
        bad = dict(env, **{field: base64.b64encode(bytes(raw)).decode()})
        with pytest.raises(DecryptionError, match="wrong key or tampered key envelope"):
            unwrap_data_key(key, bad, CKPT)
    for bad in (
        {**env, "wrapped": "!!not base64!!"},
        {**env, "nonce": env["nonce"][:-4]},
        {**env, "scheme": "asyncload-dek-v0"},
        {k: v for k, v in env.items() if k != "nonce"},
        {**env, "extra": "x"},
        {**env, "wrapped": 5},
    ):
        with pytest.raises(DecryptionError, match="malformed key envelope"):
            unwrap_data_key(key, bad, CKPT)


def test_data_keys_never_reused_across_1000_wraps() -> None:
    key = Key(os.urandom(32))
    deks, wrap_nonces = set(), set()
    for i in range(1000):
        dek, env = new_data_key(key, f"ckpt-{i}")
        deks.add(dek)
        wrap_nonces.add(env["nonce"])
        if i % 100 == 0:
            assert unwrap_data_key(key, env, f"ckpt-{i}") == dek
    assert len(deks) == 1000
    assert len(wrap_nonces) == 1000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20))
def test_nonces_unique_across_many_checkpoints_under_one_user_key(counts: list[int]) -> None:
    key = Key(b"k" * 32)
    pairs: set[tuple[bytes, bytes]] = set()
    total = 0
    for c, count in enumerate(counts):
        ckpt = f"{c}-{uuid.uuid4().hex}"
        dek, env = new_data_key(key, ckpt)
        dek = unwrap_data_key(key, env, ckpt)  # what a loader would use
        nonces = {block_nonce(i) for i in range(count)}
        assert len(nonces) == count  # unique within the checkpoint
        pairs.update((dek, n) for n in nonces)
        total += count
    assert len(pairs) == total  # (data key, nonce) never repeats across checkpoints


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_block_nonce_is_injective(i: int, j: int) -> None:
    ni, nj = block_nonce(i), block_nonce(j)
    assert len(ni) == 12 and ni[:4] == _aead.BLOCK_NONCE_DOMAIN
    assert (ni == nj) == (i == j)
    assert int.from_bytes(ni[4:], "big") == i


@given(
    st.text(max_size=40),
    st.integers(0, 2**20),
    st.integers(1, 2**20),
    st.text(max_size=40),
    st.integers(0, 2**20),
    st.integers(1, 2**20),
)
def test_block_aad_is_injective(c1: str, i1: int, n1: int, c2: str, i2: int, n2: int) -> None:
    i1, i2 = i1 % n1, i2 % n2
    same = (c1, i1, n1) == (c2, i2, n2)
    assert (block_aad(c1, i1, n1, DIGEST) == block_aad(c2, i2, n2, DIGEST)) == same


# ------------------------------------------------------------------------------------ manifest MAC


def test_manifest_mac_round_trip_and_tamper() -> None:
    dek = _aead.generate_data_key()
    body = b'{"version":1,"tensors":{}}'
    mac = manifest_mac(dek, body)
    assert len(mac) == 64 and int(mac, 16) >= 0
    verify_manifest_mac(dek, body, mac)
    verify_manifest_mac(dek, body, mac.upper())
    with pytest.raises(DecryptionError, match="manifest MAC does not match"):
        verify_manifest_mac(dek, body.replace(b"1", b"2"), mac)
    with pytest.raises(DecryptionError):
        verify_manifest_mac(os.urandom(32), body, mac)
    for bad in (mac[:-1], mac[:-1] + ("0" if mac[-1] != "0" else "1"), "", None, "é" * 64, 123):
        with pytest.raises(DecryptionError):
            verify_manifest_mac(dek, body, bad)
    # the MAC key is derived, not the data key itself
    import hashlib
    import hmac

    assert mac != hmac.new(dek, body, hashlib.sha256).hexdigest()


def test_known_answers_pin_the_on_disk_format() -> None:
    # Independent re-derivations: a change to any label or layout breaks existing stores.
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    dek = bytes(range(32))
    assert block_nonce(258) == b"blk1" + (258).to_bytes(8, "big")
    digest = hashlib.sha256(b"table").digest()
    assert table_digest(b"table") == digest
    aad = block_aad("ck", 2, 5, digest)
    assert aad == b"asyncload-blk-v1" + (2).to_bytes(8, "big") + (5).to_bytes(8, "big") + digest + b"ck"
    out = bytearray(3 + TAG_BYTES)
    encrypt_into(dek, block_nonce(2), aad, b"abc", out)
    assert bytes(out) == AESGCM(dek).encrypt(b"blk1" + (2).to_bytes(8, "big"), b"abc", aad)
    mac_key = HKDF(hashes.SHA256(), 32, None, b"asyncload-manifest-mac-v1").derive(dek)
    assert manifest_mac(dek, b"m") == hmac.new(mac_key, b"m", hashlib.sha256).hexdigest()
    user = Key(bytes(range(32, 64)))
    env = wrap_data_key(user, dek, "ck")
    nonce = base64.b64decode(env["nonce"])
    sealed = base64.b64decode(env["wrapped"])
    assert AESGCM(user.secret_bytes()).decrypt(nonce, sealed, b"asyncload-dek-v1ck") == dek


# ------------------------------------------------------------------------------------ keys


def test_key_repr_str_pickle_hide_material() -> None:
    raw = os.urandom(32)
    key = Key(raw)
    for text in (repr(key), str(key), f"{key}", f"{key!r}", f"{key:>80}", repr([key]), repr({"k": key})):
        assert not _leaks(text, raw), text
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert key == Key(raw) and key != Key(os.urandom(32))
    assert key.secret_bytes() == raw
    with pytest.raises(TypeError):
        hash(key)


def test_key_parsing_valid_forms(tmp_path: pathlib.Path) -> None:
    raw = os.urandom(32)
    key = Key(raw)
    assert load_key(raw) == key
    assert load_key(bytearray(raw)) == key
    assert load_key(memoryview(raw)) == key
    assert load_key(key) is key
    assert load_key(raw.hex()) == key
    assert load_key("  " + raw.hex().upper() + "\n") == key
    assert load_key(raw.hex().encode() + b"\r\n") == key
    assert key_from_hex(raw.hex()) == key
    f_raw = tmp_path / "raw.key"
    f_raw.write_bytes(raw)
    f_hex = tmp_path / "hex.key"
    f_hex.write_text(raw.hex() + "\n")
    assert key_from_file(f_raw) == key and load_key(f_hex) == key and key_from_file(str(f_hex)) == key
    # a raw key that happens to end in whitespace bytes stays raw
    ws = raw[:30] + b" \n"
    (tmp_path / "ws.key").write_bytes(ws)
    assert key_from_file(tmp_path / "ws.key") == Key(ws)
    env = {"ASYNCLOAD_KEY": raw.hex()}
    assert key_from_env(env) == key
    assert key_from_env({}) is None and key_from_env({"ASYNCLOAD_KEY": "  "}) is None
    # precedence: key > key_file > environment
    other = os.urandom(32)
    assert resolve_key(other, f_raw, env) == Key(other)
    assert resolve_key(None, f_raw, {"ASYNCLOAD_KEY": other.hex()}) == key
    assert resolve_key(None, None, env) == key
    assert resolve_key(None, None, {}) is None


def test_key_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = os.urandom(32)
    monkeypatch.setenv("ASYNCLOAD_KEY", raw.hex())
    assert key_from_env() == Key(raw) and resolve_key() == Key(raw)
    monkeypatch.delenv("ASYNCLOAD_KEY")
    assert key_from_env() is None


@pytest.mark.anyio
async def test_aload_key_accepts_sync_and_async_callables() -> None:
    raw = os.urandom(32)

    async def service() -> bytes:
        return raw

    assert await _aead.aload_key(service) == Key(raw)
    assert await _aead.aload_key(lambda: raw.hex()) == Key(raw)
    assert await _aead.aload_key(raw) == Key(raw)
    with pytest.raises(KeyFormatError):
        await _aead.aload_key(lambda: 42)


def _bad_key_inputs(tmp_path: pathlib.Path) -> list[tuple[str, object, bytes | str]]:
    """(case id, value given to load_key, the secret text that must not leak)."""
    r31, r33 = os.urandom(31), os.urandom(33)
    h63 = os.urandom(32).hex()[:63]
    h66 = os.urandom(33).hex()
    nonhex = os.urandom(32).hex()[:60] + "zzzz"
    unicode_hex = os.urandom(32).hex()[:63] + "é"
    cases: list[tuple[str, object, bytes | str]] = [
        ("raw31", r31, r31),
        ("raw33", r33, r33),
        ("hex63", h63, h63),
        ("hex66", h66, h66),
        ("nonhex", nonhex, nonhex),
        ("nonhex_bytes", nonhex.encode(), nonhex),
        ("unicode", unicode_hex, unicode_hex[:63]),
    ]
    for name, content in (
        ("file31", r31),
        ("file33", r33),
        ("filehex63", h63.encode()),
        ("filenonhex", nonhex.encode()),
    ):
        path = tmp_path / f"{name}.key"
        path.write_bytes(content)
        cases.append((name, path, content))
    return cases


def test_bad_keys_raise_clear_errors_without_material(tmp_path: pathlib.Path) -> None:
    for case, value, secret in _bad_key_inputs(tmp_path):
        with pytest.raises(KeyFormatError) as info:
            load_key(value)  # type: ignore[arg-type]
        err = info.value
        assert (
            isinstance(err, FormatError) and isinstance(err, AsyncloadError) and isinstance(err, ValueError)
        )
        text = _exc_text(err)
        assert not _leaks(text, secret), (case, text)
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
        if err.__context__ is not None:  # hidden from tracebacks, but reachable: must not leak either
            assert not _leaks(_exc_text(err.__context__), secret), case
        assert "hex" in str(err) or "bytes" in str(err), (case, str(err))
    for value in (12345, None, 1.5):
        with pytest.raises(KeyFormatError, match="got"):
            load_key(value)  # type: ignore[arg-type]


def test_bad_env_and_missing_file_errors(tmp_path: pathlib.Path) -> None:
    secret = os.urandom(32).hex()[:62] + "xy"
    with pytest.raises(KeyFormatError, match="ASYNCLOAD_KEY") as info:
        key_from_env({"ASYNCLOAD_KEY": secret})
    assert not _leaks(_exc_text(info.value), secret)
    with pytest.raises(KeyFormatError, match="cannot be read"):
        key_from_file(tmp_path / "missing.key")
    big = tmp_path / "big.key"
    big.write_bytes(os.urandom(10_000))
    with pytest.raises(KeyFormatError, match="too large") as info:
        key_from_file(big)
    assert not _leaks(_exc_text(info.value), big.read_bytes()[:64])


def test_decryption_errors_never_show_keys() -> None:
    user = Key(os.urandom(32))
    dek, env = new_data_key(user, CKPT)
    sealed = _seal(dek, 0, 1, _random(256))
    sealed[0] ^= 1
    with pytest.raises(DecryptionError) as info:
        decrypt_into(dek, block_nonce(0), block_aad(CKPT, 0, 1, DIGEST), sealed, bytearray(256), index=0)
    assert not _leaks(_exc_text(info.value), dek)
    with pytest.raises(DecryptionError) as info:
        unwrap_data_key(Key(os.urandom(32)), env, CKPT)
    text = _exc_text(info.value)
    assert not _leaks(text, dek) and not _leaks(text, user.secret_bytes())
