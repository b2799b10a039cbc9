//! Secrets at rest: values are sealed with AES-256-GCM before they reach the
//! database, under a key kept beside it in `DATA/secret.key`.
//!
//! Each sealed value is `nonce (12 random bytes) || ciphertext+tag`, with the
//! secret's name as associated data, so a sealed value copied to another name does
//! not open. The key file is 32 random bytes, created mode 0600 on first use. Back it
//! up together with the database: losing it loses every stored secret, and a backup
//! of the database alone is useless for them.
//!
//! Values are never logged; opened values are wiped from memory when dropped.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

/// File name of the key in the data directory.
pub const KEY_FILE: &str = "secret.key";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// Errors sealing or opening secrets; each names the file or secret involved.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key file could not be read or created.
    #[error("cannot {op} secret key file {path}: {source}")]
    KeyFile {
        /// Key file path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file exists but does not hold a key.
    #[error(
        "secret key file {path} holds {len} bytes, not {KEY_LEN}; restore it from the backup \
         made with the database (without it the stored secrets cannot be read)"
    )]
    KeyLength {
        /// Key file path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A sealed value did not open.
    #[error(
        "cannot decrypt secret {name:?}: it was sealed under another key (was DATA/secret.key \
         replaced or lost?) or its stored value is damaged; set the secret again"
    )]
    Open {
        /// Secret name.
        name: String,
    },
    /// Encryption failed (the value is too large for AES-GCM).
    #[error("cannot seal secret {name:?}")]
    Seal {
        /// Secret name.
        name: String,
    },
}

/// Seals and opens secret values with the data directory's key.
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox { .. }")
    }
}

/// One box per data directory, made on first use.
static BOXES: OnceLock<Mutex<HashMap<PathBuf, Arc<SecretBox>>>> = OnceLock::new();

impl SecretBox {
    /// The box for `data_dir` (key in `data_dir/secret.key`, created on first use),
    /// cached for the life of the process.
    pub fn for_data_dir(data_dir: &Path) -> Result<Arc<SecretBox>, SecretError> {
        let mut boxes = BOXES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(b) = boxes.get(data_dir) {
            return Ok(Arc::clone(b));
        }
        let b = Arc::new(SecretBox::with_key_file(&data_dir.join(KEY_FILE))?);
        boxes.insert(data_dir.to_owned(), Arc::clone(&b));
        Ok(b)
    }

    /// A box whose key is in `path`, creating the file (32 random bytes, mode 0600)
    /// if it does not exist.
    pub fn with_key_file(path: &Path) -> Result<SecretBox, SecretError> {
        let key = load_or_create_key(path)?;
        Ok(SecretBox {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..])),
        })
    }

    /// Encrypts `plaintext` for the secret `name`: `nonce || ciphertext`.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Seal { name: name.into() })?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a value sealed for the secret `name`; fails if it was sealed for
    /// another name, under another key, or altered.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let fail = || SecretError::Open { name: name.into() };
        if sealed.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: name.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| fail())
    }
}

fn load_or_create_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let key_err = |op: &'static str| {
        move |source| SecretError::KeyFile {
            path: path.to_owned(),
            op,
            source,
        }
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let key = Zeroizing::new(bytes);
            if key.len() != KEY_LEN {
                return Err(SecretError::KeyLength {
                    path: path.to_owned(),
                    len: key.len(),
                });
            }
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "the secret key file is readable by other users; chmod 600 it"
                );
            }
            return Ok(key);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(key_err("read")(e)),
    }
    // Write a complete file under a temporary name, then link it into place: the key
    // appears whole or not at all, and a concurrent creator's key is never replaced.
    let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
    rand::rng().fill_bytes(&mut key);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{KEY_FILE}.{}.{:x}",
        std::process::id(),
        rand::rng().next_u64()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()
    };
    let linked = write().and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            tracing::info!(path = %path.display(), "created the secret key; back it up with the database");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
        Err(e) => Err(key_err("create")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding_to_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = SecretBox::with_key_file(&dir.path().join(KEY_FILE)).unwrap();
        let sealed = b.seal("api-key", b"hunter2").unwrap();
        assert_eq!(sealed.len(), NONCE_LEN + 7 + 16);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&b.open("api-key", &sealed).unwrap()[..], b"hunter2");
        // Fresh nonce every time.
        assert_ne!(b.seal("api-key", b"hunter2").unwrap(), sealed);
        // Moved to another name: refused, and the error names the secret.
        let e = b.open("other", &sealed).unwrap_err();
        assert!(e.to_string().contains("\"other\""), "{e}");
        // Any flipped bit: refused.
        for i in [0, NONCE_LEN, sealed.len() - 1] {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert!(b.open("api-key", &t).is_err(), "byte {i}");
        }
        assert!(b.open("api-key", &sealed[..5]).is_err());
        // Empty values work too.
        let e = b.seal("e", b"").unwrap();
        assert!(b.open("e", &e).unwrap().is_empty());
    }

    #[test]
    fn key_file_is_made_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let a = SecretBox::with_key_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let sealed = a.seal("x", b"v").unwrap();
        let b = SecretBox::with_key_file(&path).unwrap();
        assert_eq!(&b.open("x", &sealed).unwrap()[..], b"v");
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE]);
        // Another key does not open it.
        let other = tempfile::tempdir().unwrap();
        let c = SecretBox::with_key_file(&other.path().join(KEY_FILE)).unwrap();
        assert!(c.open("x", &sealed).is_err());
    }

    #[test]
    fn a_damaged_key_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, b"short").unwrap();
        let e = SecretBox::with_key_file(&path).unwrap_err();
        assert!(matches!(e, SecretError::KeyLength { len: 5, .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }

    #[test]
    fn boxes_are_cached_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretBox::for_data_dir(dir.path()).unwrap();
        let b = SecretBox::for_data_dir(dir.path()).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
