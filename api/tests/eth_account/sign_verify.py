#!/usr/bin/env python3
"""The eth-account side of api/tests/eip712_eth_account.rs.

Protocol §6 (EIP-712 messages) checked against `eth-account`, a wallet library written
independently of Veil. The types and the domain below are transcribed from the spec, not from the
Rust code; only the message values come from the Rust test.

Reads one JSON object on stdin:

    {"cases": [{"primaryType": "KeyRequest",
                "domain": {"chainId": 31337, "verifyingContract": "0x..."},
                "message": {...the message's JSON form in the Veil API...},
                "privateKey": "0x" + 64 hex,      # the key this script signs with
                "rustSignature": "0x" + 130 hex,  # the Rust side's signature over "message"
                "tamperedMessage": {...}}]}       # "message" with one field changed
                                                  # (these two are optional: without them only
                                                  # eth-account's signature is asked for)

and writes one JSON object on stdout:

    {"ethAccountVersion": "...",
     "results": [{"address": the address of privateKey,
                  "signature": eth-account's signature over "message",
                  "digest", "domainSeparator", "structHash": the EIP-712 hashes (hex, no 0x),
                  "recoveredRust": the signer recovered from rustSignature over "message",
                  "recoveredTampered": the signer recovered from rustSignature over
                                       "tamperedMessage"}]}

Exits with status 3 and a line on stderr when eth-account is not installed.
"""

import json
import sys
import uuid

try:
    import eth_account
    from eth_account import Account
    from eth_account.messages import encode_typed_data
    from eth_utils import keccak
except ImportError as e:  # pragma: no cover - reported by the Rust test
    print(f"eth-account is not importable ({e})", file=sys.stderr)
    sys.exit(3)

DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def fields(spec):
    """Parses "bytes16 sessionId,uint8 kind" into EIP-712 type entries."""
    out = []
    for part in spec.split(","):
        ty, name = part.split(" ")
        out.append({"name": name, "type": ty})
    return out


# Protocol §6, type strings verbatim.
TYPE_STRINGS = [
    "OpenSession(bytes16 sessionId,uint8 kind,uint64 expiresAt,bytes16 nonce)",
    "KeyRequest(bytes16 sessionId,bytes16 taskId,uint8 scope,uint32 keyVersion,bytes32 recipient,uint64 expiresAt,bytes16 nonce)",
    "SubmitTask(bytes16 sessionId,bytes16 taskId,bytes32 promptHash,string promptUrn,string model,uint64 expiresAt,bytes16 nonce)",
    "TaskResult(bytes16 sessionId,bytes16 taskId,bytes32 promptHash,bytes32 resultHash,string resultUrn)",
    "MinerLogin(bytes32 recipient,uint64 expiresAt,bytes16 nonce)",
]
TYPES = {}
for s in TYPE_STRINGS:
    name, rest = s.split("(", 1)
    TYPES[name] = fields(rest.rstrip(")"))

# Fields that carry a UUID (its 16 raw bytes); every other bytesN field is lowercase hex.
UUID_FIELDS = {"sessionId", "taskId"}


def to_eip712(primary, message):
    """Converts the Veil JSON form of a message to EIP-712 values."""
    want = [f["name"] for f in TYPES[primary]]
    if sorted(message) != sorted(want):
        raise ValueError(f"{primary}: JSON fields {sorted(message)} differ from §6 {sorted(want)}")
    out = {}
    for f in TYPES[primary]:
        name, ty = f["name"], f["type"]
        v = message[name]
        if ty.startswith("bytes"):
            size = int(ty[len("bytes"):])
            if name in UUID_FIELDS:
                if str(uuid.UUID(v)) != v:
                    raise ValueError(f"{name}: {v!r} is not a lowercase hyphenated UUID")
                b = uuid.UUID(v).bytes
            else:
                if v != v.lower() or v.startswith("0x"):
                    raise ValueError(f"{name}: {v!r} is not lowercase hex without 0x")
                b = bytes.fromhex(v)
            if len(b) != size:
                raise ValueError(f"{name}: {len(b)} bytes, want {size}")
            out[name] = b
        elif ty.startswith("uint"):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name}: {v!r} is not an integer")
            out[name] = v
        elif ty == "string":
            if not isinstance(v, str):
                raise ValueError(f"{name}: {v!r} is not a string")
            out[name] = v
        else:
            raise ValueError(f"{name}: unexpected type {ty}")
    return out


def domain_data(d):
    return {
        "name": "Veil",
        "version": "1",
        "chainId": d["chainId"],
        "verifyingContract": d["verifyingContract"],
    }


def full_message(primary, domain, message):
    return {
        "types": {"EIP712Domain": DOMAIN_TYPE, primary: TYPES[primary]},
        "primaryType": primary,
        "domain": domain_data(domain),
        "message": to_eip712(primary, message),
    }


def digest_of(signable):
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def run_case(case):
    primary, domain, message = case["primaryType"], case["domain"], case["message"]
    account = Account.from_key(case["privateKey"])

    # Sign through the domain_data/message_types/message_data entry point...
    signed = Account.sign_typed_data(
        account.key,
        domain_data(domain),
        {primary: TYPES[primary]},
        to_eip712(primary, message),
    )
    # ...and check that the full_message entry point hashes the same.
    signable = encode_typed_data(full_message=full_message(primary, domain, message))
    digest = digest_of(signable)
    if bytes(signed.message_hash) != digest:
        raise ValueError("eth-account's two typed-data entry points disagree")
    if Account.recover_message(signable, signature=signed.signature) != account.address:
        raise ValueError("eth-account does not recover its own signature")

    # A case without "rustSignature" only asks for eth-account's signature (the router tests
    # drive a whole flow with it).
    recovered_rust = recovered_tampered = None
    if "rustSignature" in case:
        recovered_rust = Account.recover_message(signable, signature=case["rustSignature"])
        tampered = encode_typed_data(
            full_message=full_message(primary, domain, case["tamperedMessage"])
        )
        recovered_tampered = Account.recover_message(tampered, signature=case["rustSignature"])

    return {
        "address": account.address,
        "signature": "0x" + bytes(signed.signature).hex(),
        "digest": digest.hex(),
        "domainSeparator": bytes(signable.header).hex(),
        "structHash": bytes(signable.body).hex(),
        "recoveredRust": recovered_rust,
        "recoveredTampered": recovered_tampered,
    }


def main():
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    results = [run_case(c) for c in request["cases"]]
    json.dump({"ethAccountVersion": eth_account.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
