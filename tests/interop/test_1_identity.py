"""1. Same seed, same address: the key file and the recovery-phrase vector."""

import json
import os
import stat
import subprocess
import unittest

from harness import OONODE, fresh_dir, py_keys, scratch, write_seed

# PROTOCOL-NOTES.md, "Identity".
PHRASE = "legal winner thank year wave sausage worth useful legal winner thank yellow"
PHRASE_SEED = "c2969d023619f94365f2a51fa8e4fb4095be6b515421ca194190a747ccfff5d8"
PHRASE_ADDRESS = "0xf8405257284c15e67fd759703d0c04afdf2f216153b9781946f096cae1990a95"


def oonode_keys(co_dir):
    done = subprocess.run([str(OONODE), "keys", "--co-dir", str(co_dir), "--json"],
                          capture_output=True, text=True, timeout=20, cwd=str(scratch() / "work"))
    if done.returncode != 0:
        raise AssertionError(f"oonode keys failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


class SameSeedSameAddress(unittest.TestCase):
    def test_python_key_file_read_by_oonode(self):
        co = fresh_dir("id-python-key")
        write_seed(co, os.urandom(32))
        python = py_keys(co)["address"]
        self.assertEqual(oonode_keys(co)["address"], python)

    def test_oonode_key_file_read_by_python(self):
        co = fresh_dir("id-oonode-key")
        made = oonode_keys(co)  # creates the key
        key_file = co / "keys" / "agent.key"
        self.assertEqual(len(key_file.read_bytes()), 32, "oonode's key file is the raw seed")
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(py_keys(co)["address"], made["address"])

    def test_recovery_phrase_vector(self):
        from connectonion import address
        recovered = address.recover(PHRASE)
        seed = bytes(recovered["signing_key"])
        self.assertEqual(seed.hex(), PHRASE_SEED, "the package's phrase → seed")
        self.assertEqual(recovered["address"], PHRASE_ADDRESS, "the package's phrase → address")
        # oonode reads no phrase (keys/recovery.txt is optional for us): the seed the
        # phrase gives, as a key file, must be the same address there.
        co = fresh_dir("id-phrase")
        write_seed(co, seed)
        self.assertEqual(oonode_keys(co)["address"], PHRASE_ADDRESS)


if __name__ == "__main__":
    unittest.main()
