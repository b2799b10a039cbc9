//! TLS certificates: a local certificate authority for development (leaf certificates
//! issued on demand per SNI name), a static certificate the operator brings, or an ACME
//! certificate swapped in at runtime when it is renewed.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use time::{Duration, OffsetDateTime};
use tracing::warn;

use crate::ProxyError;

/// File name of the CA certificate (public, mode 0644: users import it into trust stores).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How many issued leaf certificates are kept; older ones are evicted least-recently-used.
const CACHE_CAP: usize = 1024;
/// Leaf lifetime; below the 398 days browsers accept for server certificates.
const LEAF_DAYS: i64 = 397;
/// CA lifetime: long, so users do not have to re-trust it often.
const CA_DAYS: i64 = 3650;

/// The crypto provider everything here uses: ring, so no cmake-built aws-lc is needed.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority kept on disk, which signs leaf certificates for the proxy's
/// domains so browsers that trust `ca.pem` once accept every sandbox host.
pub struct LocalCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads `ca.pem` and `ca-key.pem` from `dir`, or creates both (atomically, each
    /// written to a temporary file and renamed) when either is missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, ProxyError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        std::fs::create_dir_all(dir).map_err(|source| ProxyError::WriteFile {
            path: dir.to_owned(),
            source,
        })?;
        let key = KeyPair::generate().map_err(|source| issue_err("local CA", source))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|source| issue_err("local CA", source))?;
        // Key first: a crash in between leaves no certificate, so the pair is recreated.
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Self::load(&cert_path, &key_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, ProxyError> {
        let cert_pem = read_string(cert_path)?;
        let key_pem = read_string(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| parse_err(key_path, e))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| parse_err(cert_path, e))?;
        // A key that does not match the certificate would issue leaves nobody trusts.
        CertifiedKey::from_der(vec![cert_der.clone()], key_der(&key), &provider()).map_err(
            |e| ProxyError::ParsePem {
                path: key_path.to_owned(),
                reason: format!("{e}; remove both CA files to create a new CA"),
            },
        )?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| parse_err(cert_path, e))?;
        Ok(Self { cert_pem, issuer })
    }

    /// The CA certificate in PEM form, for users to add to their trust store.
    pub fn ca_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// Issues a leaf certificate for `names` whose private key is `leaf_key`.
    fn issue(
        &self,
        names: &[String],
        leaf_key: &KeyPair,
    ) -> Result<CertificateDer<'static>, ProxyError> {
        let first = names.first().map(String::as_str).unwrap_or_default();
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| issue_err(first, e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(LEAF_DAYS);
        let mut serial = rand::random::<[u8; 16]>();
        serial[0] &= 0x7f; // positive, as RFC 5280 requires
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(leaf_key, &self.issuer)
            .map_err(|e| issue_err(first, e))?;
        Ok(cert.der().clone())
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Atelier");
    dn.push(DnType::CommonName, "Atelier local development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_DAYS);
    params
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), ProxyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let err = |source| ProxyError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    tmp.write_all(contents).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

pub(crate) fn read_string(path: &Path) -> Result<String, ProxyError> {
    std::fs::read_to_string(path).map_err(|source| ProxyError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_err(path: &Path, reason: impl fmt::Display) -> ProxyError {
    ProxyError::ParsePem {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn issue_err(name: &str, source: rcgen::Error) -> ProxyError {
    ProxyError::IssueCert {
        name: name.to_owned(),
        source,
    }
}

/// Picks the certificate for each TLS handshake: one fixed certificate (brought by the
/// operator or obtained by ACME, replaceable at runtime) or, without one, a leaf issued by
/// the local CA for the SNI name.
#[derive(Debug)]
pub struct CertResolver {
    local: Option<Box<LocalIssuer>>,
    /// Served for every handshake when set; swapped by [`CertResolver::set_certified_key`].
    fixed: RwLock<Option<Arc<CertifiedKey>>>,
}

/// State for on-demand issuance. One leaf key is shared by all leaves: generating a key
/// per name would only add handshake latency, and every leaf lives in this process anyway.
struct LocalIssuer {
    ca: Arc<LocalCa>,
    domains: Vec<String>,
    leaf_key: KeyPair,
    signing_key: Arc<dyn SigningKey>,
    default: Arc<CertifiedKey>,
    cache: Mutex<Cache>,
}

impl fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("domains", &self.domains)
            .finish_non_exhaustive()
    }
}

/// A small LRU: a use counter per entry, the smallest evicted when full.
#[derive(Default)]
struct Cache {
    tick: u64,
    entries: HashMap<String, (Arc<CertifiedKey>, u64)>,
}

impl Cache {
    fn get(&mut self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(name).map(|(cert, used)| {
            *used = tick;
            cert.clone()
        })
    }

    fn insert(&mut self, name: String, cert: Arc<CertifiedKey>) {
        if self.entries.len() >= CACHE_CAP
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.entries.insert(name, (cert, self.tick));
    }
}

impl CertResolver {
    /// Issues certificates from `ca` for names equal to or under `domains` (the first is
    /// the main domain); any other or missing SNI name gets the main domain's certificate
    /// (`domain` and `*.domain`).
    pub fn local(ca: Arc<LocalCa>, domains: &[&str]) -> Result<Self, ProxyError> {
        let domains = domains
            .iter()
            .map(|d| normalize_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        let main = domains.first().ok_or_else(|| ProxyError::InvalidDomain {
            domain: String::new(),
        })?;
        let leaf_key = KeyPair::generate().map_err(|e| issue_err(main, e))?;
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der(&leaf_key))?;
        let default_der = ca.issue(&[main.clone(), format!("*.{main}")], &leaf_key)?;
        let default = Arc::new(CertifiedKey::new(vec![default_der], signing_key.clone()));
        Ok(Self {
            local: Some(Box::new(LocalIssuer {
                ca,
                domains,
                leaf_key,
                signing_key,
                default,
                cache: Mutex::default(),
            })),
            fixed: RwLock::new(None),
        })
    }

    /// Serves `cert` (a chain and its signing key, e.g. from ACME) for every handshake
    /// until [`CertResolver::set_certified_key`] replaces it.
    pub fn from_certified_key(cert: Arc<CertifiedKey>) -> Self {
        Self {
            local: None,
            fixed: RwLock::new(Some(cert)),
        }
    }

    /// Replaces the certificate served from now on (e.g. after an ACME renewal); handshakes
    /// already under way keep the old one. On a local-CA resolver this takes precedence
    /// over the issued leaves.
    pub fn set_certified_key(&self, cert: Arc<CertifiedKey>) {
        *self.fixed.write().unwrap_or_else(PoisonError::into_inner) = Some(cert);
    }

    /// The fixed certificate currently served, if any (none for a plain local-CA resolver).
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.fixed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves one certificate chain and key from PEM files (e.g. an operator's wildcard
    /// certificate) for every handshake.
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Self, ProxyError> {
        let cert_pem = std::fs::read(cert_path).map_err(|source| ProxyError::ReadFile {
            path: cert_path.to_owned(),
            source,
        })?;
        let key_pem = std::fs::read(key_path).map_err(|source| ProxyError::ReadFile {
            path: key_path.to_owned(),
            source,
        })?;
        let certified = certified_key_from_pem(&cert_pem, cert_path, &key_pem, key_path)?;
        Ok(Self::from_certified_key(Arc::new(certified)))
    }
}

/// Builds a certified key from a PEM chain and a PEM private key; the paths only name the
/// inputs in errors. Fails when the key does not belong to the leaf certificate.
pub(crate) fn certified_key_from_pem(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<CertifiedKey, ProxyError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(cert_path, e))?;
    if chain.is_empty() {
        return Err(parse_err(cert_path, "no CERTIFICATE block found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| parse_err(key_path, e))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        parse_err(
            key_path,
            format!("{e} (does the key belong to {})?", cert_path.display()),
        )
    })
}

impl LocalIssuer {
    fn covers(&self, name: &str) -> bool {
        self.domains.iter().any(|d| {
            name == d
                || name
                    .strip_suffix(d.as_str())
                    .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
        })
    }

    fn resolve(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(str::to_ascii_lowercase).filter(|n| self.covers(n)) else {
            return self.default.clone();
        };
        let cache = || self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cert) = cache().get(&name) {
            return cert;
        }
        match self.ca.issue(std::slice::from_ref(&name), &self.leaf_key) {
            Ok(der) => {
                let cert = Arc::new(CertifiedKey::new(vec![der], self.signing_key.clone()));
                cache().insert(name, cert.clone());
                cert
            }
            Err(err) => {
                warn!(error = %err, "issuing a leaf certificate failed; using the default");
                self.default.clone()
            }
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(cert) = self.certified_key() {
            return Some(cert);
        }
        self.local
            .as_ref()
            .map(|local| local.resolve(client_hello.server_name()))
    }
}

fn normalize_domain(domain: &str) -> Result<String, ProxyError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    match DnsName::try_from(d.as_str()) {
        Ok(_) if !d.is_empty() && !d.contains('*') => Ok(d),
        _ => Err(ProxyError::InvalidDomain {
            domain: domain.to_owned(),
        }),
    }
}

/// A rustls server configuration using `resolver`, offering HTTP/2 and HTTP/1.1 (ALPN).
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, ProxyError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_with_modes_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let (cert, key) = (dir.path().join(CA_CERT_FILE), dir.path().join(CA_KEY_FILE));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(&key), 0o600);
        let again = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.ca_pem(), again.ca_pem());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temp files left"
        );
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(a.path()).unwrap();
        LocalCa::load_or_create(b.path()).unwrap();
        std::fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = LocalCa::load_or_create(a.path()).unwrap_err();
        assert!(matches!(err, ProxyError::ParsePem { .. }), "{err}");
    }

    #[test]
    fn covers_only_names_under_domains() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let r = CertResolver::local(ca, &["localhost", "Example.Test."]).unwrap();
        let local = r.local.as_deref().expect("local");
        for ok in [
            "localhost",
            "a.localhost",
            "a.b.localhost",
            "example.test",
            "x.example.test",
        ] {
            assert!(local.covers(ok), "{ok}");
        }
        for bad in [
            "xlocalhost",
            ".localhost",
            "example.com",
            "localhost.evil",
            "test",
        ] {
            assert!(!local.covers(bad), "{bad}");
        }
        assert!(
            CertResolver::local(Arc::new(LocalCa::load_or_create(dir.path()).unwrap()), &[])
                .is_err()
        );
    }

    #[test]
    fn static_pem_pair_loads_and_mismatch_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let a = rcgen::generate_simple_self_signed(vec!["*.example.test".into()]).unwrap();
        let b = KeyPair::generate().unwrap();
        let cert = write("cert.pem", a.cert.pem());
        let key = write("key.pem", a.signing_key.serialize_pem());
        let other = write("other.pem", b.serialize_pem());
        let r = CertResolver::from_pem_files(&cert, &key).unwrap();
        assert!(r.local.is_none() && r.certified_key().is_some());
        let err = CertResolver::from_pem_files(&cert, &other).unwrap_err();
        assert!(matches!(err, ProxyError::ParsePem { .. }), "{err}");
        let err = CertResolver::from_pem_files(&key, &key).unwrap_err();
        assert!(matches!(err, ProxyError::ParsePem { .. }), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = CertResolver::from_pem_files(&missing, &key).unwrap_err();
        assert!(matches!(err, ProxyError::ReadFile { .. }), "{err}");
    }

    #[test]
    fn set_certified_key_replaces_the_served_certificate() {
        let certified = |name: &str| {
            let c = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
            let key = PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
            Arc::new(CertifiedKey::from_der(vec![c.cert.der().clone()], key, &provider()).unwrap())
        };
        let (a, b) = (certified("a.example.test"), certified("b.example.test"));
        let r = CertResolver::from_certified_key(a.clone());
        assert!(Arc::ptr_eq(&r.certified_key().unwrap(), &a));
        r.set_certified_key(b.clone());
        assert!(Arc::ptr_eq(&r.certified_key().unwrap(), &b));

        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let local = CertResolver::local(ca, &["localhost"]).unwrap();
        assert!(local.certified_key().is_none());
        local.set_certified_key(a.clone());
        assert!(Arc::ptr_eq(&local.certified_key().unwrap(), &a));
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let r = CertResolver::local(ca, &["localhost"]).unwrap();
        let local = r.local.as_deref().expect("local");
        let mut cache = Cache::default();
        for i in 0..CACHE_CAP {
            cache.insert(format!("n{i}"), local.default.clone());
        }
        assert!(cache.get("n0").is_some());
        cache.insert("new".into(), local.default.clone());
        assert_eq!(cache.entries.len(), CACHE_CAP);
        assert!(cache.get("n0").is_some(), "recently used entry kept");
        assert!(cache.get("n1").is_none(), "oldest entry evicted");
    }
}
