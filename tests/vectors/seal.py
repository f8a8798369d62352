"""Writes tests/vectors/seal.json: a SEAL handshake and sealed frames made by the Python
package (connectonion 1.9.2, network/sealed.py) from fixed keys, for src/proto/seal.rs's
test to reproduce byte for byte.

    target/venv-connectonion/bin/python tests/vectors/seal.py > tests/vectors/seal.json
"""

import json

from nacl.public import Box, PrivateKey
from nacl.signing import SigningKey

from connectonion import address as addr
from connectonion.network import sealed


def keys(byte):
    key = SigningKey(bytes([byte]) * 32)
    return {"address": "0x" + key.verify_key.encode().hex(), "signing_key": key}


client, host = keys(1), keys(2)
client_eph, host_eph = PrivateKey(bytes([3]) * 32), PrivateKey(bytes([4]) * 32)
timestamp = 1767225600

seal_payload = {
    "type": "SEAL",
    "to": host["address"],
    "from": client["address"],
    "ephemeral": bytes(client_eph.public_key).hex(),
    "timestamp": timestamp,
}
seal = dict(seal_payload, signature=addr.sign(client, sealed._canonical(seal_payload)).hex())
ok_payload = {
    "type": "SEALED_OK",
    "to": client["address"],
    "from": host["address"],
    "ephemeral": bytes(host_eph.public_key).hex(),
    "client_ephemeral": seal["ephemeral"],
}
sealed_ok = dict(ok_payload, signature=addr.sign(host, sealed._canonical(ok_payload)).hex())

# The package's own checks accept both halves of the handshake.
sealed.host_accept(seal, host, now=timestamp)
sealed.client_finish(sealed_ok, seal, client_eph)

host_ch = sealed.SealedChannel(Box(host_eph, client_eph.public_key), send_tag=b"h2c", recv_tag=b"c2h")
client_ch = sealed.SealedChannel(Box(client_eph, host_eph.public_key), send_tag=b"c2h", recv_tag=b"h2c")
c2h = [{"type": "CONNECT", "to": host["address"]}, {"type": "INPUT", "prompt": "héllo ✓"}]
h2c = [{"type": "OUTPUT", "result": "héllo ✓", "session_id": "s1"}]
c2h_frames = [client_ch.seal(m) for m in c2h]
h2c_frames = [host_ch.seal(m) for m in h2c]
assert [host_ch.open(f) for f in c2h_frames] == c2h
assert [client_ch.open(f) for f in h2c_frames] == h2c

print(json.dumps({
    "client_seed": "01" * 32,
    "host_seed": "02" * 32,
    "client_ephemeral_secret": "03" * 32,
    "host_ephemeral_secret": "04" * 32,
    "seal": seal,
    "sealed_ok": sealed_ok,
    "c2h": c2h_frames,
    "h2c": h2c_frames,
    # The clear text inside each frame, as the package writes it (UTF-8, not escaped).
    "clear_c2h": [json.dumps(m, ensure_ascii=False) for m in c2h],
    "clear_h2c": [json.dumps(m, ensure_ascii=False) for m in h2c],
}, indent=1, ensure_ascii=False))
