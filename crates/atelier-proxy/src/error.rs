//! The crate's one error type: each variant names the failed operation and its input.

use std::path::PathBuf;

/// Failures of the proxy's setup (certificates, TLS). Request-time failures are not
/// errors here: they become HTTP responses (502) so one bad upstream never stops the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Reading a CA, certificate or key file failed.
    #[error("reading {path}: {source}")]
    ReadFile {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Writing the local CA (or creating its directory) failed.
    #[error("writing {path}: {source}; check that the directory is writable")]
    WriteFile {
        /// The file or directory that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A PEM file does not hold a usable certificate or key.
    #[error("parsing {path}: {reason}")]
    ParsePem {
        /// The offending file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// Generating or signing a certificate failed.
    #[error("issuing a certificate for {name}: {source}")]
    IssueCert {
        /// The DNS name the certificate was for (or "local CA").
        name: String,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// A configured domain is not a valid DNS name.
    #[error(
        "invalid proxy domain {domain:?}: expected a DNS name such as localhost or example.com"
    )]
    InvalidDomain {
        /// The rejected domain.
        domain: String,
    },
    /// rustls rejected the certificate, key or protocol configuration.
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The ACME configuration is unusable (names, challenge type, directory URL, hook).
    #[error("invalid ACME configuration: {reason}")]
    AcmeConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Creating, loading or storing the ACME account failed.
    #[error("ACME account at {directory_url} failed: {reason}")]
    AcmeAccount {
        /// The ACME directory the account belongs to.
        directory_url: String,
        /// The server's problem detail or the local failure.
        reason: String,
    },
    /// Ordering a certificate failed (challenge, validation, finalisation or download).
    #[error("ACME order for {names} failed: {reason}")]
    AcmeOrder {
        /// The names the certificate was ordered for, comma-separated.
        names: String,
        /// The server's problem detail or the local failure.
        reason: String,
    },
    /// The DNS-01 hook did not publish or remove a TXT record.
    #[error("DNS-01 hook {hook} {action} {record} failed: {reason}")]
    AcmeHook {
        /// The hook executable.
        hook: PathBuf,
        /// `add` or `remove`.
        action: &'static str,
        /// The TXT record name, e.g. `_acme-challenge.example.com`.
        record: String,
        /// Exit status, spawn error or timeout.
        reason: String,
    },
}
