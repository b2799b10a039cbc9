//! Atelier's shared test kit (a dev-dependency only, never published): what the
//! integration suites of several crates share.
//!
//! - [`manager`]: the manager harness, the real `atelier serve` on a data dir, bridge
//!   and subnet of its own ([`Server`], [`NetSlot`]).
//! - [`public`]: a "public" network namespace with an HTTP server ([`PublicNet`]) and a
//!   git server in it ([`GitServer`]).
//! - [`dns`]: [`StaticDns`], the tests' own authoritative DNS server.
//! - [`model`]: a scripted OpenAI-compatible model server ([`ModelServer`]), also
//!   servable inside a network namespace guests reach.
//! - [`opencode`]: the real `opencode serve` on the host, offline ([`OpenCodeHost`]).
//! - [`opencode_ws`]: the workspace YAML for OpenCode in a guest against that model.
//! - [`poll`]: [`poll_until`], waiting with a deadline and a message naming what was
//!   awaited (tests never sleep to synchronise).
//! - [`process`]: liveness and process groups from `/proc`.
//! - [`upstream`]: an upstream HTTP server and deterministic payloads for proxy tests.
//!
//! Helpers panic with a message saying what failed: they run inside tests.

pub mod dns;
pub mod manager;
pub mod model;
pub mod opencode;
pub mod opencode_ws;
pub mod poll;
pub mod process;
pub mod public;
pub mod upstream;

pub use dns::StaticDns;
pub use manager::{NetSlot, Server, atelier_bin, free_port, http_ok, images_dir};
pub use model::{ModelRequest, ModelServer, Script, ToolCall, Turn};
pub use opencode::{OpenCodeHost, opencode_bin};
pub use poll::{poll_until, poll_until_async, wait_until};
pub use process::{alive, group_members, pids_matching};
pub use public::{GitServer, PublicNet, git};

/// Parses `s` as JSON, panicking with the text when it is not.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}
