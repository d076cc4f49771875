#!/usr/bin/env python3
"""Independent check of the Veil protocol v1 vectors, written from docs/protocol.md
alone with the `cryptography` package (pip install cryptography).

    python3 keys/tests/vectors/check_vectors.py [path/to/protocol-v1.json]

Re-derives every key, re-seals every envelope from its inputs and compares bytes,
opens every invalid envelope and checks it is refused for the stated reason,
re-wraps every key, and checks every URN. Prints 'N passed, M failed'.
"""
import hashlib
import hmac
import json
import os
import re
import struct
import sys
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives import serialization


def hkdf_extract(salt, ikm):
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk, info, length):
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def hkdf(salt, ikm, info, length=32):
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def lp(x):
    return struct.pack(">H", len(x)) + x


SALT = b"veil/kdf/v1"
SCOPES = {"session": 1, "task": 2}
PURPOSES = {"prompt": 1, "result": 2, "attachment": 3}


def k_session(seed, sid):
    return hkdf(SALT, seed, lp(b"veil/v1/session") + lp(sid))


def k_task(ks, tid):
    return hkdf(SALT, ks, lp(b"veil/v1/task") + lp(tid))


def uuid_bytes(s):
    if s is None:
        return bytes(16)
    u = uuid.UUID(s)
    assert str(u) == s, "UUID not canonical"
    return u.bytes


def blob_keys(key, salt):
    prk = hkdf_extract(salt, key)
    return hkdf_expand(prk, lp(b"veil/v1/blob-key"), 32), hkdf_expand(prk, lp(b"veil/v1/blob-commit"), 32)


def nonce(i, last):
    return bytes(7) + struct.pack(">I", i) + bytes([1 if last else 0])


def seal(key, scope, purpose, e, version, sid, tid, salt, chunks):
    k_enc, commit = blob_keys(key, salt)
    header = b"VEIL" + bytes([1, scope, purpose, e]) + struct.pack(">I", version) + sid + tid + salt + commit
    aead = AESGCM(k_enc)
    out = header
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        ct = aead.encrypt(nonce(i, last), chunk, header)
        out += struct.pack(">I", (1 << 31 if last else 0) | len(ct)) + ct
    return out


class Refused(Exception):
    pass


def open_blob(key, blob):
    """Returns the list of chunk plaintexts, or raises Refused(reason)."""
    if len(blob) < 108:
        raise Refused("short_header")
    h = blob[:108]
    if h[:4] != b"VEIL":
        raise Refused("bad_magic")
    if h[4] != 1:
        raise Refused("unsupported_format")
    scope, purpose, e = h[5], h[6], h[7]
    if scope not in (1, 2):
        raise Refused("bad_scope")
    if purpose not in (1, 2, 3):
        raise Refused("bad_purpose")
    if not 10 <= e <= 24:
        raise Refused("bad_chunk_exponent")
    if (h[28:44] == bytes(16)) != (scope == 1):
        raise Refused("scope_task_id_mismatch")
    k_enc, commit = blob_keys(key, h[44:76])
    if not hmac.compare_digest(commit, h[76:108]):
        raise Refused("wrong_key")
    c = 1 << e
    aead = AESGCM(k_enc)
    chunks, at, i = [], 108, 0
    while True:
        if len(blob) - at < 4:
            raise Refused("truncated")
        (word,) = struct.unpack(">I", blob[at:at + 4])
        last, n = bool(word >> 31), word & 0x7FFFFFFF
        if n < 16 or n > c + 16:
            raise Refused("bad_frame_length")
        if not last and n == 16:
            raise Refused("empty_non_final_chunk")
        if len(blob) - at - 4 < n:
            raise Refused("truncated")
        try:
            chunks.append(aead.decrypt(nonce(i, last), blob[at + 4:at + 4 + n], h))
        except InvalidTag:
            raise Refused("decrypt")
        at += 4 + n
        i += 1
        if last:
            if at != len(blob):
                raise Refused("trailing_data")
            return chunks


def x25519_public(secret):
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def wrap(eph_secret, recipient_pub, key, scope, version, sid, tid):
    e = X25519PrivateKey.from_private_bytes(eph_secret)
    E = x25519_public(eph_secret)
    ss = e.exchange(X25519PublicKey.from_public_bytes(recipient_pub))
    assert ss != bytes(32)
    ctx = bytes([scope]) + struct.pack(">I", version) + sid + tid
    k_wrap = hkdf(E + recipient_pub, ss, lp(b"veil/v1/wrap") + lp(ctx))
    return E + AESGCM(k_wrap).encrypt(bytes(12), key, ctx)


NAME = re.compile(r"[a-z0-9-]{1,63}")
BUCKET = re.compile(r"[a-z0-9._-]{1,63}")
SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")


def parse_urn(s):
    prefix = "urn:blob:"
    if not s.startswith(prefix):
        return None
    parts = s[len(prefix):].split(":", 4)
    if len(parts) != 5:
        return None
    version, storage, provider, bucket, file_name = parts
    if version != "v1" or storage not in ("s3", "gcs", "azure", "fs", "mem"):
        return None
    if not NAME.fullmatch(provider) or not BUCKET.fullmatch(bucket):
        return None
    if len(file_name.encode()) > 1024:
        return None
    for seg in file_name.split("/"):
        if not SEGMENT.fullmatch(seg) or seg in (".", ".."):
            return None
    return {"version": version, "storage_type": storage, "provider": provider,
            "bucket": bucket, "file_name": file_name}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "protocol-v1.json")
    doc = json.load(open(path))
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print("FAIL:", what)

    x = bytes.fromhex
    for v in doc["kdf"]:
        ks = k_session(x(v["seed"]), uuid_bytes(v["session_id"]))
        check(ks.hex() == v["k_session"], f"kdf k_session {v['session_id']}")
        check(k_task(ks, uuid_bytes(v["task_id"])).hex() == v["k_task"], f"kdf k_task {v['task_id']}")
    for v in doc["envelope"]:
        chunks = [x(c) for c in v["chunks"]]
        blob = seal(x(v["key"]), SCOPES[v["scope"]], PURPOSES[v["purpose"]], v["chunk_exp"],
                    v["key_version"], uuid_bytes(v["session_id"]), uuid_bytes(v["task_id"]),
                    x(v["salt"]), chunks)
        check(blob.hex() == v["blob"], f"envelope seal {v['scope']}/{v['purpose']}/{len(chunks)} chunks")
        try:
            check(open_blob(x(v["key"]), x(v["blob"])) == chunks, "envelope open")
        except Refused as r:
            check(False, f"envelope open refused: {r}")
    for v in doc["envelope_invalid"]:
        try:
            open_blob(x(v["key"]), x(v["blob"]))
            check(False, f"invalid envelope accepted ({v['reason']})")
        except Refused as r:
            check(str(r) == v["reason"], f"invalid envelope: got {r}, expected {v['reason']}")
    for v in doc["wrap"]:
        rpub = x25519_public(x(v["recipient_secret"]))
        check(rpub.hex() == v["recipient_public"], "wrap recipient public key")
        w = wrap(x(v["ephemeral_secret"]), rpub, x(v["key"]), SCOPES[v["scope"]], v["key_version"],
                 uuid_bytes(v["session_id"]), uuid_bytes(v["task_id"]))
        check(w.hex() == v["wrapped"], f"wrap {v['scope']} v{v['key_version']}")
    for v in doc["urn"]:
        parts = parse_urn(v["urn"])
        check((parts is not None) == v["valid"] and parts == v["parts"], f"urn {v['urn']!r}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
