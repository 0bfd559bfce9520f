"""Interoperability: a route header sealed by an independent HPKE implementation (pyhpke),
built only from docs/protocol.md, opens in relayfed (`relayfed-proxy ech open`).

The ECHConfigList is produced by `relayfed-proxy ech keygen` and parsed here by our own
reader of the TLS ECH format, so both directions of the format are exercised too.
"""

import base64
import json
import os
import pathlib
import struct
import subprocess

import pytest
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROXY = os.environ.get("RELAYFED_PROXY") or str(ROOT / "target" / "debug" / "relayfed-proxy")


@pytest.fixture(autouse=True, scope="module")
def proxy_binary():
    assert os.access(PROXY, os.X_OK), f"{PROXY} missing: run `make test-python` (it builds relayfed-proxy)"


def str8(s: bytes) -> bytes:
    assert 1 <= len(s) <= 255
    return bytes([len(s)]) + s


def vec16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def parse_ech_config_list(data: bytes):
    """Returns [(config_id, kem_id, public_key, suites, whole_config_bytes)] (version 0xfe0d only)."""
    (total,) = struct.unpack(">H", data[:2])
    body = data[2 : 2 + total]
    assert len(body) == total
    out, i = [], 0
    while i < len(body):
        version, length = struct.unpack(">HH", body[i : i + 4])
        whole = body[i : i + 4 + length]
        contents = whole[4:]
        i += 4 + length
        if version != 0xFE0D:
            continue
        config_id = contents[0]
        (kem_id,) = struct.unpack(">H", contents[1:3])
        (pk_len,) = struct.unpack(">H", contents[3:5])
        pk = contents[5 : 5 + pk_len]
        j = 5 + pk_len
        (suites_len,) = struct.unpack(">H", contents[j : j + 2])
        suites = [struct.unpack(">HH", contents[j + 2 + k : j + 6 + k]) for k in range(0, suites_len, 4)]
        out.append((config_id, kem_id, pk, suites, whole))
    return out


def inner_route(dest_node, dest_main, service, port, origin) -> bytes:
    return (
        str8(dest_node.encode())
        + str8(dest_main.encode())
        + str8(service.encode())
        + struct.pack(">H", port)
        + str8(origin.encode())
    )


def sealed_route_header(config, aead_id, main, inner: bytes) -> bytes:
    config_id, kem_id, pk, suites, whole = config
    assert kem_id == 0x0020 and (0x0001, aead_id) in suites
    aead = {0x0001: AEADId.AES128_GCM, 0x0003: AEADId.CHACHA20_POLY1305}[aead_id]
    suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, aead)
    info = b"relayfed ech v1" + b"\x00" + whole
    enc, sender = suite.create_sender_context(suite.kem.deserialize_public_key(pk), info=info)
    padded_len = max(64, -(-len(inner) // 64) * 64)
    plaintext = inner + b"\x00" * (padded_len - len(inner))
    aad = (
        b"relayfed route v1"
        + bytes([1])
        + str8(main.encode())
        + bytes([config_id])
        + struct.pack(">HH", 0x0001, aead_id)
        + vec16(enc)
    )
    payload = sender.seal(plaintext, aad=aad)
    header = bytes([1, 3, 0x01]) + str8(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") + bytes([0])
    header += str8(main.encode()) + bytes([config_id]) + struct.pack(">HH", 0x0001, aead_id) + vec16(enc) + vec16(payload)
    return header


def keygen(tmp_path: pathlib.Path, config_id: int):
    key = tmp_path / "ech.json"
    out = subprocess.run(
        [PROXY, "ech", "keygen", "--public-name", "relay.acme.example", "--config-id", str(config_id), "--out", str(key)],
        check=True,
        capture_output=True,
        text=True,
    )
    return key, base64.b64decode(out.stdout.strip())


def ech_open(key, header: bytes):
    return subprocess.run(
        [PROXY, "ech", "open", "--key", str(key), "--route-header", base64.b64encode(header).decode()],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("aead_id", [0x0001, 0x0003], ids=["aes-128-gcm", "chacha20-poly1305"])
def test_pyhpke_sealed_route_opens_in_relayfed(tmp_path, aead_id):
    key, ech_list = keygen(tmp_path, 7)
    [config] = parse_ech_config_list(ech_list)
    assert config[0] == 7
    inner = inner_route("pay-us", "hub-us", "payments", 9090, "shop-eu@hub-eu")
    result = ech_open(key, sealed_route_header(config, aead_id, "hub-us", inner))
    assert result.returncode == 0, result.stderr
    opened = json.loads(result.stdout)
    assert opened == {
        "configId": 7,
        "main": "hub-us",
        "destNode": "pay-us",
        "destMain": "hub-us",
        "service": "payments",
        "port": 9090,
        "origin": "shop-eu@hub-eu",
    }


def test_a_tampered_outer_field_does_not_open(tmp_path):
    key, ech_list = keygen(tmp_path, 3)
    [config] = parse_ech_config_list(ech_list)
    header = bytearray(sealed_route_header(config, 0x0001, "hub-us", inner_route("a", "hub-us", "s", 1, "b@c")))
    # The byte after `main` is config_id; the AEAD id follows the KDF id: change aead 1 -> 3.
    idx = header.index(b"hub-us") + len(b"hub-us") + 1 + 2 + 1
    header[idx] = 0x03
    result = ech_open(key, bytes(header))
    assert result.returncode != 0
    assert "ECH_DECRYPT_FAILED" in result.stderr
