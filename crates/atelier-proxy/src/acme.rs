//! ACME (RFC 8555) certificates for real domains: an account kept in a state directory,
//! orders answered by HTTP-01 (through the port-80 router's [`AcmeChallenges`] map) or
//! DNS-01 (through an operator's hook), and renewals swapped into a [`CertResolver`] while
//! the listeners keep running.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, Problem, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, DnsName};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::tls::{certified_key_from_pem, parse_err, provider, write_atomic};
use crate::{AcmeChallenges, CertResolver, ProxyError};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (untrusted certificates, generous rate limits).
pub const LETS_ENCRYPT_STAGING_DIRECTORY: &str =
    "https://acme-staging-v02.api.letsencrypt.org/directory";
/// File in the state directory holding the ACME account and its private key (mode 0600).
pub const ACME_ACCOUNT_FILE: &str = "account.json";
/// File in the state directory holding the certificate chain (PEM, mode 0644).
pub const ACME_CERT_FILE: &str = "cert.pem";
/// File in the state directory holding the certificate's private key (PEM, mode 0600).
pub const ACME_KEY_FILE: &str = "key.pem";
/// Renew this long before expiry unless configured otherwise.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the renewal loop looks at the certificate at most.
const CHECK_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// First pause after a failed renewal; doubled per failure up to [`CHECK_INTERVAL`].
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// Connect timeout and per-request response-head timeout towards the ACME server.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to validate all challenges.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the server may take to issue after finalisation.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one DNS-01 hook run may take (it may wait for DNS propagation).
const HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// Upper bound for a whole order, hooks included, so `ensure` always returns.
const ORDER_TIMEOUT: Duration = Duration::from_secs(1800);
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// How the ACME server is shown that we control the names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// The server fetches `http://{name}/.well-known/acme-challenge/{token}`: port 80 of
    /// every name must reach the router from [`crate::redirect_to_https`].
    Http01,
    /// A TXT record `_acme-challenge.{name}`, published by `hook add <record-name>
    /// <txt-value>` and withdrawn by `hook remove <record-name> <txt-value>` (exit 0 =
    /// done). Required for wildcard names.
    Dns01 {
        /// The executable to run.
        hook: PathBuf,
    },
}

/// What to order, from where, and where to keep the account and certificate.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The ACME directory URL (https), e.g. [`LETS_ENCRYPT_DIRECTORY`].
    pub directory_url: String,
    /// Contact for the account, e.g. `ops@example.com` or `mailto:ops@example.com`.
    pub contact: Option<String>,
    /// The names on the certificate, e.g. `["example.com", "*.example.com"]`; a wildcard
    /// needs [`AcmeChallenge::Dns01`].
    pub names: Vec<String>,
    /// The challenge type to answer.
    pub challenge: AcmeChallenge,
    /// Holds [`ACME_ACCOUNT_FILE`], [`ACME_CERT_FILE`] and [`ACME_KEY_FILE`]; created 0700.
    pub state_dir: PathBuf,
    /// PEM files with extra roots to trust for the ACME server (a private CA, pebble),
    /// added to the built-in web PKI roots.
    pub extra_roots: Vec<PathBuf>,
    /// Renew when the certificate expires within this long.
    pub renew_before: Duration,
}

impl AcmeConfig {
    /// A configuration with no contact, no extra roots and [`DEFAULT_RENEW_BEFORE`].
    pub fn new(
        directory_url: impl Into<String>,
        names: Vec<String>,
        challenge: AcmeChallenge,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            directory_url: directory_url.into(),
            contact: None,
            names,
            challenge,
            state_dir: state_dir.into(),
            extra_roots: Vec::new(),
            renew_before: DEFAULT_RENEW_BEFORE,
        }
    }
}

type HttpsClient = HyperClient<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// Obtains and renews one certificate for [`AcmeConfig::names`].
pub struct AcmeManager {
    cfg: AcmeConfig,
    challenges: AcmeChallenges,
    http: HttpsClient,
    account: Mutex<Option<Account>>,
    /// Serialises orders so `ensure` and the renewal loop never order twice at once.
    ordering: Mutex<()>,
}

impl fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory_url", &self.cfg.directory_url)
            .field("names", &self.cfg.names)
            .field("challenge", &self.cfg.challenge)
            .field("state_dir", &self.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

/// A certificate read from the state directory.
struct Stored {
    certified: Arc<CertifiedKey>,
    not_after: OffsetDateTime,
}

/// The account file: credentials (with the private key) and the directory they belong to.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory_url: String,
    credentials: AccountCredentials,
}

impl AcmeManager {
    /// Validates `cfg` (names, wildcard vs. challenge type, directory URL, hook, extra
    /// roots) without contacting the server. HTTP-01 answers are published in
    /// `challenges`, which the port-80 router serves.
    pub fn new(mut cfg: AcmeConfig, challenges: AcmeChallenges) -> Result<Self, ProxyError> {
        cfg.names = normalize_names(&cfg.names, &cfg.challenge)?;
        check_directory_url(&cfg.directory_url)?;
        if let AcmeChallenge::Dns01 { hook } = &cfg.challenge {
            check_hook(hook)?;
        }
        let http = http_client(&cfg.extra_roots)?;
        Ok(Self {
            cfg,
            challenges,
            http,
            account: Mutex::new(None),
            ordering: Mutex::new(()),
        })
    }

    /// The validated names (lowercase, without trailing dots, duplicates removed).
    pub fn names(&self) -> &[String] {
        &self.cfg.names
    }

    /// Returns the stored certificate if it covers the names and is not due for renewal;
    /// otherwise orders one (creating and storing the account on first use), answers the
    /// challenges, finalises with a fresh key and stores key and chain atomically.
    pub async fn ensure(&self) -> Result<Arc<CertifiedKey>, ProxyError> {
        let _ordering = self.ordering.lock().await;
        if let Some(stored) = self.load_stored() {
            if self.due_in(stored.not_after).is_zero() {
                info!(names = %self.label(), not_after = %stored.not_after, "ACME certificate is due for renewal");
            } else {
                debug!(names = %self.label(), not_after = %stored.not_after, "using the stored ACME certificate");
                return Ok(stored.certified);
            }
        }
        match tokio::time::timeout(ORDER_TIMEOUT, self.order()).await {
            Ok(result) => result,
            Err(_) => Err(self.order_err(format!(
                "no result within {} s; check the ACME server and the DNS-01 hook",
                ORDER_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Renews the certificate when due (looking at least twice a day) and hands each new
    /// one to `resolver`; failures are logged and retried with back-off. Runs until the
    /// future is dropped.
    pub async fn run_renewals(self: Arc<Self>, resolver: Arc<CertResolver>) {
        let mut retry = RETRY_FIRST;
        loop {
            let wait = self
                .load_stored()
                .map_or(Duration::ZERO, |s| self.due_in(s.not_after));
            if !wait.is_zero() {
                let wait = wait.min(CHECK_INTERVAL);
                debug!(names = %self.label(), wait_secs = wait.as_secs(), "next ACME renewal check");
                tokio::time::sleep(wait).await;
                continue;
            }
            match self.ensure().await {
                Ok(cert) => {
                    resolver.set_certified_key(cert);
                    retry = RETRY_FIRST;
                    info!(names = %self.label(), "renewed ACME certificate is now served");
                    let still_due = self
                        .load_stored()
                        .is_none_or(|s| self.due_in(s.not_after).is_zero());
                    if still_due {
                        warn!(
                            names = %self.label(),
                            renew_before_secs = self.cfg.renew_before.as_secs(),
                            "the new certificate is already due for renewal: renew_before is \
                             longer than the certificate's lifetime; checking again in 12 hours"
                        );
                        tokio::time::sleep(CHECK_INTERVAL).await;
                    }
                }
                Err(err) => {
                    warn!(error = %err, retry_secs = retry.as_secs(), "ACME renewal failed; will retry");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(CHECK_INTERVAL);
                }
            }
        }
    }

    fn label(&self) -> String {
        self.cfg.names.join(", ")
    }

    fn order_err(&self, reason: impl Into<String>) -> ProxyError {
        ProxyError::AcmeOrder {
            names: self.label(),
            reason: reason.into(),
        }
    }

    fn account_err(&self, reason: impl Into<String>) -> ProxyError {
        ProxyError::AcmeAccount {
            directory_url: self.cfg.directory_url.clone(),
            reason: reason.into(),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.cfg.state_dir.join(file)
    }

    /// Time left until renewal is due; zero when it is.
    fn due_in(&self, not_after: OffsetDateTime) -> Duration {
        let left = not_after - OffsetDateTime::now_utc();
        left.try_into()
            .unwrap_or(Duration::ZERO)
            .saturating_sub(self.cfg.renew_before)
    }

    /// The stored certificate, if present, readable, matching its key and covering all
    /// names. Anything else is logged and treated as absent, so a new one is ordered.
    fn load_stored(&self) -> Option<Stored> {
        let (cert_path, key_path) = (self.path(ACME_CERT_FILE), self.path(ACME_KEY_FILE));
        if !cert_path.exists() && !key_path.exists() {
            return None;
        }
        match self.read_stored(&cert_path, &key_path) {
            Ok(stored) => stored,
            Err(err) => {
                warn!(error = %err, "ignoring the stored ACME certificate; ordering a new one");
                None
            }
        }
    }

    fn read_stored(&self, cert_path: &Path, key_path: &Path) -> Result<Option<Stored>, ProxyError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ProxyError::ReadFile {
                path: path.to_owned(),
                source,
            })
        };
        let certified =
            certified_key_from_pem(&read(cert_path)?, cert_path, &read(key_path)?, key_path)?;
        let (not_after, sans) = leaf_info(&certified, cert_path)?;
        if let Some(missing) = self.cfg.names.iter().find(|n| !sans.contains(*n)) {
            info!(missing = %missing, "the stored ACME certificate does not cover all names; ordering a new one");
            return Ok(None);
        }
        Ok(Some(Stored {
            certified: Arc::new(certified),
            not_after,
        }))
    }

    fn acme_http(&self) -> Box<dyn HttpClient> {
        Box::new(AcmeHttp(self.http.clone()))
    }

    /// The account: cached, else loaded from the state directory, else created and stored.
    async fn account(&self, fresh: bool) -> Result<Account, ProxyError> {
        let mut cached = self.account.lock().await;
        if !fresh && let Some(account) = &*cached {
            return Ok(account.clone());
        }
        let path = self.path(ACME_ACCOUNT_FILE);
        let stored = if fresh || !path.exists() {
            None
        } else {
            let text = crate::tls::read_string(&path)?;
            let stored: StoredAccount = serde_json::from_str(&text).map_err(|e| {
                parse_err(
                    &path,
                    format!("{e}; remove it to register a new ACME account"),
                )
            })?;
            Some(stored)
        };
        let account = match stored {
            Some(s) if s.directory_url == self.cfg.directory_url => {
                Account::builder_with_http(self.acme_http())
                    .from_credentials(s.credentials)
                    .await
                    .map_err(|e| self.account_err(describe(&e)))?
            }
            other => {
                if let Some(s) = other {
                    warn!(old = %s.directory_url, new = %self.cfg.directory_url, "the stored ACME account belongs to another directory; registering a new one");
                }
                self.create_account(&path).await?
            }
        };
        *cached = Some(account.clone());
        Ok(account)
    }

    async fn create_account(&self, path: &Path) -> Result<Account, ProxyError> {
        let contact = self.cfg.contact.as_deref().map(|c| {
            if c.contains(':') {
                c.to_owned()
            } else {
                format!("mailto:{c}")
            }
        });
        let contact: Vec<&str> = contact.as_deref().into_iter().collect();
        let new = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = Account::builder_with_http(self.acme_http())
            .create(&new, self.cfg.directory_url.clone(), None)
            .await
            .map_err(|e| self.account_err(describe(&e)))?;
        let stored = StoredAccount {
            directory_url: self.cfg.directory_url.clone(),
            credentials,
        };
        let json = serde_json::to_vec_pretty(&stored)
            .map_err(|e| self.account_err(format!("serialising the account: {e}")))?;
        self.create_state_dir()?;
        write_atomic(path, &json, 0o600)?;
        info!(directory_url = %self.cfg.directory_url, account = %account.id(), "registered an ACME account");
        Ok(account)
    }

    fn create_state_dir(&self) -> Result<(), ProxyError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cfg.state_dir)
            .map_err(|source| ProxyError::WriteFile {
                path: self.cfg.state_dir.clone(),
                source,
            })
    }

    /// One order from creation to stored certificate.
    async fn order(&self) -> Result<Arc<CertifiedKey>, ProxyError> {
        self.create_state_dir()?;
        let identifiers: Vec<Identifier> = self
            .cfg
            .names
            .iter()
            .map(|n| Identifier::Dns(n.clone()))
            .collect();
        let new_order = NewOrder::new(&identifiers);
        let account = self.account(false).await?;
        let mut order = match account.new_order(&new_order).await {
            Err(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(ACCOUNT_DOES_NOT_EXIST) => {
                warn!(directory_url = %self.cfg.directory_url, "the ACME server no longer knows the stored account; registering a new one");
                self.account(true).await?.new_order(&new_order).await
            }
            other => other,
        }
        .map_err(|e| self.order_err(describe(&e)))?;
        info!(names = %self.label(), order = %order.url(), "ACME order created");

        let mut published = Published {
            challenges: self.challenges.clone(),
            tokens: Vec::new(),
            records: Vec::new(),
        };
        let validated = self.validate(&mut order, &mut published).await;
        if let AcmeChallenge::Dns01 { hook } = &self.cfg.challenge {
            for (record, value) in published.records.drain(..) {
                if let Err(err) = run_hook(hook, "remove", &record, &value).await {
                    warn!(error = %err, "removing a DNS-01 TXT record failed; remove it by hand");
                }
            }
        }
        drop(published);
        validated?;
        self.finalize(&mut order).await
    }

    /// Publishes an answer for every pending authorization, tells the server, and waits
    /// until the order is ready.
    async fn validate(
        &self,
        order: &mut Order,
        published: &mut Published,
    ) -> Result<(), ProxyError> {
        let kind = match &self.cfg.challenge {
            AcmeChallenge::Http01 => ChallengeType::Http01,
            AcmeChallenge::Dns01 { .. } => ChallengeType::Dns01,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| self.order_err(describe(&e)))?;
            let name = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(self.order_err(format!(
                        "the authorization for {name} is {status:?}, not pending"
                    )));
                }
            }
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                self.order_err(format!(
                    "the server offered no {kind:?} challenge for {name}"
                ))
            })?;
            let key_auth = challenge.key_authorization();
            match &self.cfg.challenge {
                AcmeChallenge::Http01 => {
                    published.add_token(challenge.token.clone(), key_auth.as_str().to_owned());
                }
                AcmeChallenge::Dns01 { hook } => {
                    let base = name.strip_prefix("*.").unwrap_or(&name);
                    let record = format!("_acme-challenge.{base}");
                    let value = key_auth.dns_value();
                    run_hook(hook, "add", &record, &value).await?;
                    published.records.push((record, value));
                }
            }
            debug!(name = %name, challenge = ?kind, "ACME challenge published");
            challenge
                .set_ready()
                .await
                .map_err(|e| self.order_err(format!("{name}: {}", describe(&e))))?;
        }
        let policy = RetryPolicy::new().timeout(VALIDATION_TIMEOUT);
        let status = order.poll_ready(&policy).await.map_err(|e| match e {
            instant_acme::Error::Timeout(_) => self.order_err(format!(
                "the server did not validate the challenges within {} s; {}",
                VALIDATION_TIMEOUT.as_secs(),
                self.challenge_hint()
            )),
            e => self.order_err(format!("{}; {}", describe(&e), self.challenge_hint())),
        })?;
        match status {
            OrderStatus::Ready => Ok(()),
            OrderStatus::Invalid => {
                let reason = invalid_reason(order).await;
                Err(self.order_err(format!("{reason}; {}", self.challenge_hint())))
            }
            other => Err(self.order_err(format!("unexpected order status {other:?}"))),
        }
    }

    fn challenge_hint(&self) -> &'static str {
        match self.cfg.challenge {
            AcmeChallenge::Http01 => {
                "check that port 80 of every name reaches this server's HTTP listener"
            }
            AcmeChallenge::Dns01 { .. } => {
                "check that the DNS-01 hook publishes the TXT records on the authoritative servers"
            }
        }
    }

    /// Sends a CSR for a fresh key, waits for the chain and stores key and chain.
    async fn finalize(&self, order: &mut Order) -> Result<Arc<CertifiedKey>, ProxyError> {
        let label = self.label();
        let issue = |source| ProxyError::IssueCert {
            name: label.clone(),
            source,
        };
        let key = KeyPair::generate().map_err(issue)?;
        let mut params = CertificateParams::new(self.cfg.names.clone()).map_err(issue)?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(issue)?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| self.order_err(format!("finalising: {}", describe(&e))))?;
        let policy = RetryPolicy::new().timeout(ISSUE_TIMEOUT);
        let chain = order.poll_certificate(&policy).await.map_err(|e| {
            self.order_err(format!("downloading the certificate: {}", describe(&e)))
        })?;

        let (cert_path, key_path) = (self.path(ACME_CERT_FILE), self.path(ACME_KEY_FILE));
        let key_pem = key.serialize_pem();
        let certified =
            certified_key_from_pem(chain.as_bytes(), &cert_path, key_pem.as_bytes(), &key_path)?;
        let (not_after, sans) = leaf_info(&certified, &cert_path)?;
        if let Some(missing) = self.cfg.names.iter().find(|n| !sans.contains(*n)) {
            return Err(self.order_err(format!("the issued certificate does not cover {missing}")));
        }
        // Key first: a crash in between leaves a mismatched pair, which is re-ordered.
        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, chain.as_bytes(), 0o644)?;
        info!(names = %label, not_after = %not_after, "ACME certificate issued and stored");
        Ok(Arc::new(certified))
    }
}

/// Answers published for one order; HTTP-01 tokens are withdrawn on drop (also when the
/// order is cancelled), DNS-01 records by [`AcmeManager::order`] through the hook.
struct Published {
    challenges: AcmeChallenges,
    tokens: Vec<String>,
    records: Vec<(String, String)>,
}

impl Published {
    fn add_token(&mut self, token: String, key_auth: String) {
        self.challenges
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.clone(), key_auth);
        self.tokens.push(token);
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let mut map = self
            .challenges
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for token in self.tokens.drain(..) {
            map.remove(&token);
        }
    }
}

/// Collects why an order became invalid: the order's problem and each failed challenge's.
async fn invalid_reason(order: &mut Order) -> String {
    let mut reasons = Vec::new();
    if let Some(problem) = &order.state().error {
        reasons.push(problem_text(problem));
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Err(err) = authz.refresh().await {
            debug!(error = %err, "refreshing an authorization failed");
        }
        let name = authz.identifier().to_string();
        for challenge in &authz.challenges {
            if let Some(problem) = &challenge.error {
                reasons.push(format!("{name}: {}", problem_text(problem)));
            }
        }
    }
    if reasons.is_empty() {
        "the server marked the order invalid without a reason".to_owned()
    } else {
        reasons.join("; ")
    }
}

fn problem_text(problem: &Problem) -> String {
    let mut text = problem
        .detail
        .clone()
        .unwrap_or_else(|| "no detail given".to_owned());
    if let Some(kind) = &problem.r#type {
        text.push_str(&format!(" ({kind})"));
    }
    for sub in &problem.subproblems {
        text.push_str(&format!("; {sub}"));
    }
    text
}

/// An instant-acme error with its source chain (hyper's errors hide the cause there).
fn describe(err: &instant_acme::Error) -> String {
    if let instant_acme::Error::Api(problem) = err {
        return problem_text(problem);
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The leaf's expiry and its DNS names (lowercase).
fn leaf_info(
    certified: &CertifiedKey,
    cert_path: &Path,
) -> Result<(OffsetDateTime, HashSet<String>), ProxyError> {
    let leaf = certified
        .end_entity_cert()
        .map_err(|e| parse_err(cert_path, e))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| parse_err(cert_path, e))?;
    let not_after = cert.validity().not_after.to_datetime();
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| parse_err(cert_path, e))?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((not_after, sans))
}

/// Runs the DNS-01 hook; its output goes to the debug log only.
async fn run_hook(
    hook: &Path,
    action: &'static str,
    record: &str,
    value: &str,
) -> Result<(), ProxyError> {
    let err = |reason: String| ProxyError::AcmeHook {
        hook: hook.to_owned(),
        action,
        record: record.to_owned(),
        reason,
    };
    let output = tokio::process::Command::new(hook)
        .args([action, record, value])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(HOOK_TIMEOUT, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(err(format!("could not run it: {e}"))),
        Err(_) => {
            return Err(err(format!(
                "it did not exit within {} s and was killed",
                HOOK_TIMEOUT.as_secs()
            )));
        }
    };
    debug!(
        hook = %hook.display(),
        action,
        record,
        status = %output.status,
        stdout = %String::from_utf8_lossy(&output.stdout).trim_end(),
        stderr = %String::from_utf8_lossy(&output.stderr).trim_end(),
        "DNS-01 hook ran"
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(err(format!(
            "{} (its output is logged at debug level)",
            output.status
        )))
    }
}

fn config_err(reason: impl Into<String>) -> ProxyError {
    ProxyError::AcmeConfig {
        reason: reason.into(),
    }
}

/// Lowercases names, drops trailing dots and duplicates, and rejects what no CA issues.
fn normalize_names(names: &[String], challenge: &AcmeChallenge) -> Result<Vec<String>, ProxyError> {
    if names.is_empty() {
        return Err(config_err("no names to order a certificate for"));
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for raw in names {
        let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, base) = match name.strip_prefix("*.") {
            Some(base) => (true, base),
            None => (false, name.as_str()),
        };
        if base.is_empty() || base.contains('*') || DnsName::try_from(base).is_err() {
            return Err(config_err(format!(
                "{raw:?} is not a DNS name; use names like example.com or *.example.com"
            )));
        }
        if wildcard && *challenge == AcmeChallenge::Http01 {
            return Err(config_err(format!(
                "the wildcard name {raw:?} needs the DNS-01 challenge (a hook that publishes TXT \
                 records); HTTP-01 cannot validate wildcards"
            )));
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

fn check_directory_url(url: &str) -> Result<(), ProxyError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| config_err(format!("directory URL {url:?} is not a URL ({e})")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(config_err(format!(
            "directory URL {url:?} must be an https:// URL, e.g. {LETS_ENCRYPT_DIRECTORY}"
        )));
    }
    Ok(())
}

fn check_hook(hook: &Path) -> Result<(), ProxyError> {
    let meta = std::fs::metadata(hook)
        .map_err(|e| config_err(format!("DNS-01 hook {}: {e}", hook.display())))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(config_err(format!(
            "DNS-01 hook {} is not an executable file (chmod +x it)",
            hook.display()
        )));
    }
    Ok(())
}

/// An HTTPS client trusting the web PKI roots plus `extra_roots`, ring-only.
fn http_client(extra_roots: &[PathBuf]) -> Result<HttpsClient, ProxyError> {
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra_roots {
        let pem = std::fs::read(path).map_err(|source| ProxyError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| parse_err(path, e))?;
        if certs.is_empty() {
            return Err(parse_err(path, "no CERTIFICATE block found"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| parse_err(path, e))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(HTTP_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(HyperClient::builder(TokioExecutor::new()).build(connector))
}

/// instant-acme's transport over our own hyper client (ring, custom roots, timeouts).
struct AcmeHttp(HttpsClient);

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().to_string();
        let response = self.0.request(req);
        Box::pin(async move {
            match tokio::time::timeout(HTTP_TIMEOUT, response).await {
                Ok(Ok(rsp)) => Ok(BytesResponse::from(rsp)),
                Ok(Err(e)) => Err(instant_acme::Error::Other(
                    format!("request to {uri}: {}", error_chain(&e)).into(),
                )),
                Err(_) => Err(instant_acme::Error::Other(
                    format!(
                        "request to {uri}: no response within {} s",
                        HTTP_TIMEOUT.as_secs()
                    )
                    .into(),
                )),
            }
        })
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_normalized_and_deduplicated() {
        let dns = AcmeChallenge::Dns01 {
            hook: "/bin/true".into(),
        };
        let got = normalize_names(
            &names(&["Example.Test.", "*.example.test", "example.test"]),
            &dns,
        )
        .unwrap();
        assert_eq!(got, names(&["example.test", "*.example.test"]));
    }

    #[test]
    fn bad_names_and_wildcards_over_http01_are_rejected() {
        for bad in [
            "",
            "*.",
            "a.*.example.test",
            "exa mple.test",
            "**.example.test",
        ] {
            let err = normalize_names(&names(&[bad]), &AcmeChallenge::Http01).unwrap_err();
            assert!(matches!(err, ProxyError::AcmeConfig { .. }), "{bad}: {err}");
        }
        let err = normalize_names(&[], &AcmeChallenge::Http01).unwrap_err();
        assert!(err.to_string().contains("no names"), "{err}");
        let err = normalize_names(&names(&["*.example.test"]), &AcmeChallenge::Http01).unwrap_err();
        assert!(err.to_string().contains("DNS-01"), "{err}");
    }

    #[test]
    fn directory_must_be_https() {
        check_directory_url(LETS_ENCRYPT_DIRECTORY).unwrap();
        for bad in ["http://acme.example/dir", "acme.example/dir", "not a url"] {
            assert!(check_directory_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hook_must_be_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("hook");
        assert!(check_hook(&hook).is_err(), "missing");
        std::fs::write(&hook, "#!/bin/sh\n").unwrap();
        let err = check_hook(&hook).unwrap_err();
        assert!(err.to_string().contains("chmod +x"), "{err}");
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_hook(&hook).unwrap();
        assert!(check_hook(dir.path()).is_err(), "a directory");
    }

    #[test]
    fn published_tokens_are_withdrawn_on_drop() {
        let challenges = AcmeChallenges::default();
        let mut published = Published {
            challenges: challenges.clone(),
            tokens: Vec::new(),
            records: Vec::new(),
        };
        published.add_token("t1".into(), "t1.thumb".into());
        assert_eq!(
            challenges.read().unwrap().get("t1").map(String::as_str),
            Some("t1.thumb")
        );
        drop(published);
        assert!(challenges.read().unwrap().is_empty());
    }

    #[tokio::test]
    async fn failing_hook_error_names_the_hook_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("hook");
        std::fs::write(&hook, "#!/bin/sh\necho \"$@\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = run_hook(&hook, "add", "_acme-challenge.example.test", "v")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("add _acme-challenge.example.test"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).unwrap();
        run_hook(&ok, "remove", "_acme-challenge.example.test", "v")
            .await
            .unwrap();
    }
}
