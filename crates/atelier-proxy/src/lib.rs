//! Atelier's built-in HTTPS reverse proxy: maps `sandbox-{id}.{domain}` and
//! `dev-{name}-{id}.{domain}` hosts to routes, forwards requests (HTTP/1.1, HTTP/2,
//! WebSocket) to a sandbox's upstream address, and terminates TLS with a local CA, a
//! static certificate, or an ACME certificate it obtains and renews itself.
//!
//! It must not depend on sandbox storage or authentication: the server crate resolves a
//! [`Route`] to an upstream address, checks access, and says which credentials to strip.

#![warn(missing_docs)]

mod acme;
mod error;
mod forward;
mod headers;
mod route;
mod serve;
mod tls;

pub use acme::{
    ACME_ACCOUNT_FILE, ACME_CERT_FILE, ACME_KEY_FILE, AcmeChallenge, AcmeConfig, AcmeManager,
    DEFAULT_RENEW_BEFORE, LETS_ENCRYPT_DIRECTORY, LETS_ENCRYPT_STAGING_DIRECTORY,
};
pub use error::ProxyError;
pub use forward::{BoxError, ForwardOpts, Forwarder, Scheme};
pub use route::{Route, parse_host};
pub use serve::{AcmeChallenges, ConnLimits, redirect_to_https, serve, serve_tls};
pub use tls::{CA_CERT_FILE, CA_KEY_FILE, CertResolver, LocalCa, server_config};
