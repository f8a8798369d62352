//! Node identity: the ed25519 key, its `0x…` [`Address`], the libp2p `PeerId` of the same
//! key, and where the key lives on disk (`co_dir`).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of an address string: `0x` + 64 hex characters.
pub const ADDRESS_LEN: usize = 66;

/// Prefix of a libp2p PeerId for an ed25519 key: identity multihash (0x00, length 36)
/// of the protobuf `PublicKey { Type: Ed25519 (1), Data: <32 bytes> }`.
const PEER_ID_ED25519_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("address must start with 0x, got {0:?}")]
    MissingPrefix(String),
    #[error("address must be 0x followed by 64 hex characters, got {len} characters")]
    WrongLength { len: usize },
    #[error("address contains a character that is not hex")]
    NotHex,
    #[error("address is not a valid ed25519 public key")]
    NotAKey,
    #[error("PeerId is not an ed25519 identity key")]
    NotEd25519PeerId,
}

/// A node's address: the raw 32-byte ed25519 public key, written `0x` + 64 lowercase hex.
///
/// The same key is the node's libp2p identity, so [`Address::peer_id`] and
/// [`Address::from_peer_id`] are pure conversions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address([u8; 32]);

impl Address {
    /// Wraps raw key bytes, checking that they are a valid ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, AddressError> {
        decompressed(&bytes).ok_or(AddressError::NotAKey)?;
        Ok(Address(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The ed25519 key to verify signatures of this address with.
    pub fn verifying_key(&self) -> VerifyingKey {
        // Checked at construction.
        decompressed(&self.0).expect("address holds a valid key")
    }

    /// `0x3d40…9c98`: for logs and tables, never for identification.
    pub fn short(&self) -> String {
        let hex = hex::encode(self.0);
        format!("0x{}…{}", &hex[..4], &hex[60..])
    }

    pub fn peer_id(&self) -> libp2p_identity::PeerId {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .expect("address holds a valid key");
        libp2p_identity::PublicKey::from(key).to_peer_id()
    }

    pub fn from_peer_id(peer: &libp2p_identity::PeerId) -> Result<Self, AddressError> {
        let bytes = peer.to_bytes();
        if bytes.len() != PEER_ID_ED25519_PREFIX.len() + 32
            || bytes[..PEER_ID_ED25519_PREFIX.len()] != PEER_ID_ED25519_PREFIX
        {
            return Err(AddressError::NotEd25519PeerId);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[PEER_ID_ED25519_PREFIX.len()..]);
        Address::from_bytes(key)
    }
}

/// Keys decompressed lately, per thread: direct-mapped, keyed by the whole key.
const KEY_CACHE: usize = 64;

/// `bytes` as an ed25519 key, None if they are not one. Decompressing a key takes a square
/// root in the field, about what a signature costs, and a message names the same few keys
/// (its signer, this node) two to four times, so decompressed keys are kept. A key an
/// attacker picks only evicts another; what is kept is a pure function of the bytes.
fn decompressed(bytes: &[u8; 32]) -> Option<VerifyingKey> {
    thread_local! {
        static KEYS: std::cell::RefCell<[Option<VerifyingKey>; KEY_CACHE]> =
            const { std::cell::RefCell::new([None; KEY_CACHE]) };
    }
    // The key's last bytes are as random as its first; any byte picks a slot.
    let slot = usize::from(bytes[1]) % KEY_CACHE;
    KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        if let Some(key) = keys[slot].filter(|k| k.as_bytes() == bytes) {
            return Some(key);
        }
        let key = VerifyingKey::from_bytes(bytes).ok()?;
        keys[slot] = Some(key);
        Some(key)
    })
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let hex_part = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .ok_or_else(|| AddressError::MissingPrefix(s.chars().take(8).collect()))?;
        if s.len() != ADDRESS_LEN {
            return Err(AddressError::WrongLength { len: s.len() });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| AddressError::NotHex)?;
        Address::from_bytes(bytes)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Into a buffer on the stack: `hex::encode` builds its String a char at a time,
        // and an address is formatted a few times per request.
        let mut hex = [0u8; 64];
        hex::encode_to_slice(self.0, &mut hex).expect("64 hex digits for 32 bytes");
        f.write_str("0x")?;
        f.write_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.short())
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} holds {len} bytes; expected a raw 32-byte ed25519 seed")]
    BadLength { path: PathBuf, len: usize },
}

/// A node's signing identity. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    address: Address,
}

impl Identity {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let address = Address(key.verifying_key().to_bytes());
        Identity { key, address }
    }

    pub fn generate() -> Self {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        Identity::from_seed(key.to_bytes())
    }

    pub fn address(&self) -> Address {
        self.address
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        self.key.sign(message)
    }

    /// The raw 32-byte seed, as stored in `keys/agent.key`.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The libp2p keypair of the same key, for the swarm.
    pub fn libp2p_keypair(&self) -> libp2p_identity::Keypair {
        libp2p_identity::Keypair::ed25519_from_bytes(self.key.to_bytes())
            .expect("a 32-byte seed is a valid ed25519 secret")
    }

    /// Path of the key file inside a co_dir.
    pub fn key_path(co_dir: &Path) -> PathBuf {
        co_dir.join("keys").join("agent.key")
    }

    /// Loads `<co_dir>/keys/agent.key`, creating it (mode 0600) if it does not exist.
    /// Returns the identity and whether it was created now.
    pub fn load_or_create(co_dir: &Path) -> Result<(Self, bool), KeyFileError> {
        Self::load_or_create_file(&Self::key_path(co_dir))
    }

    /// Loads the key file at `path` (a 32-byte seed, as `agent.key`), creating it (mode
    /// 0600, with its directory) if it does not exist. Returns the identity and whether
    /// it was created now.
    pub fn load_or_create_file(path: &Path) -> Result<(Self, bool), KeyFileError> {
        let path = path.to_path_buf();
        match fs::read(&path) {
            Ok(bytes) => Ok((Self::from_key_bytes(&path, &bytes)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Identity::generate();
                match write_new_key(&path, &identity.seed()) {
                    Ok(()) => Ok((identity, true)),
                    // Another process created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let bytes = fs::read(&path).map_err(|source| KeyFileError::Read {
                            path: path.clone(),
                            source,
                        })?;
                        Ok((Self::from_key_bytes(&path, &bytes)?, false))
                    }
                    Err(source) => Err(KeyFileError::Write { path, source }),
                }
            }
            Err(source) => Err(KeyFileError::Read { path, source }),
        }
    }

    fn from_key_bytes(path: &Path, bytes: &[u8]) -> Result<Self, KeyFileError> {
        let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyFileError::BadLength {
            path: path.to_path_buf(),
            len: bytes.len(),
        })?;
        Ok(Identity::from_seed(seed))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Writes the seed to a fresh file with mode 0600 from the start (never world-readable,
/// not even for an instant), refusing to overwrite an existing key.
fn write_new_key(path: &Path, seed: &[u8; 32]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(seed)?;
    file.sync_all()
}

/// Finds the co_dir the way the Python host does: the project's `.co/` (walking up from
/// `start`, stopping at `$HOME` or at a directory that holds `.git`), else `~/.co/`.
pub fn find_co_dir(start: &Path) -> PathBuf {
    let home = home_dir();
    let mut dir = Some(start);
    while let Some(d) = dir {
        if home.as_deref() == Some(d) {
            break;
        }
        let candidate = d.join(".co");
        if candidate.is_dir() {
            return candidate;
        }
        if d.join(".git").exists() {
            break;
        }
        dir = d.parent();
    }
    home.unwrap_or_else(|| PathBuf::from(".")).join(".co")
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_parses_only_0x_and_64_hex() {
        let id = Identity::from_seed([7; 32]);
        let text = id.address().to_string();
        assert_eq!(text.len(), ADDRESS_LEN);
        assert_eq!(text.parse::<Address>().unwrap(), id.address());
        assert_eq!(
            text.to_uppercase()
                .replacen("0X", "0x", 1)
                .parse::<Address>()
                .unwrap(),
            id.address()
        );
        assert!(matches!(
            text[2..].parse::<Address>(),
            Err(AddressError::MissingPrefix(_))
        ));
        assert!(matches!(
            text[..65].parse::<Address>(),
            Err(AddressError::WrongLength { .. })
        ));
        let bad = format!("0x{}zz", &text[2..64]);
        assert!(matches!(bad.parse::<Address>(), Err(AddressError::NotHex)));
    }

    #[test]
    fn address_round_trips_through_peer_id() {
        let id = Identity::from_seed([9; 32]);
        let peer = id.address().peer_id();
        assert_eq!(peer, id.libp2p_keypair().public().to_peer_id());
        assert_eq!(Address::from_peer_id(&peer).unwrap(), id.address());
        // A sha2-256 PeerId (as RSA keys get) carries no key to recover.
        let mut hashed = vec![0x12, 0x20];
        hashed.extend_from_slice(&[7u8; 32]);
        let other = libp2p_identity::PeerId::from_bytes(&hashed).unwrap();
        assert!(Address::from_peer_id(&other).is_err());
    }

    #[test]
    fn short_form_keeps_both_ends() {
        let id = Identity::from_seed([1; 32]);
        let full = id.address().to_string();
        let short = id.address().short();
        assert!(short.starts_with(&full[..6]) && short.ends_with(&full[62..]));
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.address(), b.address());
        let meta = fs::metadata(Identity::key_path(dir.path())).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
    }

    #[test]
    fn truncated_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = Identity::key_path(dir.path());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, [1u8; 31]).unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("31 bytes"), "{err}");
    }

    #[test]
    fn project_co_dir_wins_and_git_stops_the_walk() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("proj");
        let nested = project.join("a/b");
        fs::create_dir_all(&nested).unwrap();
        fs::create_dir_all(project.join(".co")).unwrap();
        assert_eq!(find_co_dir(&nested), project.join(".co"));

        // A .git between the start and the .co stops the walk.
        fs::create_dir_all(project.join("a/.git")).unwrap();
        assert_ne!(find_co_dir(&nested), project.join(".co"));
    }

    proptest::proptest! {
        #[test]
        fn addresses_write_and_read_back(seed in proptest::prelude::any::<[u8; 32]>()) {
            let a = Identity::from_seed(seed).address();
            let text = a.to_string();
            proptest::prop_assert_eq!(text.len(), ADDRESS_LEN);
            proptest::prop_assert_eq!(text.parse::<Address>().unwrap(), a);
            let upper = format!("0X{}", text[2..].to_uppercase());
            proptest::prop_assert_eq!(upper.parse::<Address>().unwrap(), a);
            proptest::prop_assert_eq!(Address::from_peer_id(&a.peer_id()).unwrap(), a);
        }

        /// The cache of decompressed keys answers as the check itself does, whatever
        /// came before in the same slot (every key here shares slot 0).
        #[test]
        fn kept_keys_answer_as_decompressing_does(
            keys in proptest::collection::vec(proptest::prelude::any::<[u8; 32]>(), 1..40),
            seeds in proptest::collection::vec(proptest::prelude::any::<[u8; 32]>(), 1..10),
        ) {
            let valid = seeds.iter().map(|s| Identity::from_seed(*s).address().0);
            let mut all: Vec<[u8; 32]> = keys.into_iter().chain(valid).collect();
            all.iter_mut().for_each(|k| k[1] = 0);
            for bytes in all.iter().chain(all.iter().rev()) {
                let direct = VerifyingKey::from_bytes(bytes).ok();
                proptest::prop_assert_eq!(decompressed(bytes), direct);
                if direct.is_some() {
                    let a = Address::from_bytes(*bytes).unwrap();
                    proptest::prop_assert_eq!(&a.verifying_key().to_bytes(), bytes);
                }
            }
        }

        #[test]
        fn any_32_bytes_are_an_address_exactly_when_they_are_a_key(
            bytes in proptest::prelude::any::<[u8; 32]>(),
        ) {
            let text = format!("0x{}", hex::encode(bytes));
            match Address::from_bytes(bytes) {
                Ok(a) => {
                    proptest::prop_assert_eq!(a.to_string(), text.clone());
                    proptest::prop_assert_eq!(text.parse::<Address>().unwrap(), a);
                }
                Err(_) => proptest::prop_assert!(text.parse::<Address>().is_err()),
            }
        }

        #[test]
        fn any_other_text_is_refused_without_panicking(text in "\\PC*|0x[0-9a-fA-F]{0,70}") {
            if let Ok(a) = text.parse::<Address>() {
                // Accepted: it was an address (in any letter case, maybe with blanks).
                proptest::prop_assert_eq!(a.to_string(), text.trim().to_ascii_lowercase());
            }
        }
    }
}
