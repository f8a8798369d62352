"""6. Over `wss://`, as every public relay is: `oonode relay --tls-cert --tls-key` with a
test CA made here, an oonode node on it (`--relay-ca`), a Python `host()` on it, and
callers of both kinds through it. The package trusts the test CA through SSL_CERT_FILE
(OpenSSL's own variable, which Python's default TLS context reads).
"""

import datetime
import ipaddress
import os
import unittest

import harness
from harness import Checks, call_answer, check_sealed_and_fast, check_turns, py_conversation

fx = {}
_saved = {}


def make_pki(directory):
    """A CA and a certificate for 127.0.0.1 and localhost signed by it, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oonode interop CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(leaf.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def setUpModule():
    fx["pki"] = make_pki(harness.fresh_dir("t6-pki"))
    for name in ("SSL_CERT_FILE",):
        _saved[name] = os.environ.get(name)
    os.environ["SSL_CERT_FILE"] = str(fx["pki"]["ca"])
    _, ready = harness.start_relay("t6-relay", "--tls-cert", fx["pki"]["cert"],
                                   "--tls-key", fx["pki"]["key"])
    fx["relay"] = ready["url"]
    assert fx["relay"].startswith("wss://"), ready
    _, node = harness.start_node("t6-node", "translator", relay=fx["relay"], http=False,
                                 extra=("--relay-ca", fx["pki"]["ca"]))
    fx["node"] = node["address"]
    _, fx["py"], _ = harness.start_py_host("t6-py-host", fx["relay"])
    harness.wait_listed(fx["relay"], fx["node"], 15)
    harness.wait_listed(fx["relay"], fx["py"], 15)


def tearDownModule():
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class OverWss(unittest.TestCase):
    def test_python_client_to_oonode_node_over_wss_sealed(self):
        keys = harness.new_py_keys("t6-caller")
        _, turns, probe = py_conversation(
            fx["node"], fx["relay"], ["Translate hello to Spanish", "My name is John",
                                      "What is my name?"], keys)
        c = Checks(self)
        check_turns(c, turns, ["Hola", "Nice to meet you, John! I'll remember your name.",
                               "Your name is John"], "over wss")
        check_sealed_and_fast(c, turns, probe, "over wss")
        c.done()

    def test_oonode_call_to_python_host_over_wss(self):
        out = call_answer(self, fx["py"], "hello over wss", "--via", "relay",
                          "--relay", fx["relay"], "--relay-ca", fx["pki"]["ca"])
        self.assertEqual(out["result"], "py-agent heard: hello over wss (turn 1)")
        self.assertTrue(out["sealed"], out)

    def test_an_untrusted_relay_certificate_is_one_clear_line(self):
        status, out, _, err = harness.oonode_call(fx["node"], "hi", "--via", "relay",
                                                  "--relay", fx["relay"])
        c = Checks(self)
        c.equal(status, 3, f"exit status ({err})")
        c.true(len(err.strip().splitlines()) == 1, f"one line: {err!r}")
        c.true("the certificate is not trusted" in err, f"says why: {err!r}")
        c.done()
