//! The CLI's HTTP client: the shared `atelier-client` crate, pointed by the global
//! options.

pub use atelier_client::{CliError, Client, decode, exit_status, find_token};

use crate::Global;

impl atelier_client::Endpoint for Global {
    fn url(&self) -> &str {
        &self.url
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn token_file(&self) -> Option<&std::path::Path> {
        self.token_file.as_deref()
    }

    fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }
}
