//! The manager's settings.

use std::path::PathBuf;
use std::time::Duration;

use atelier_storage::BackendChoice;
use atelier_vmm::AccelChoice;

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where everything lives: database, images, pool, sandboxes.
    pub data_dir: PathBuf,
    /// Accelerator choice (`ATELIER_ACCEL`).
    pub accel: AccelChoice,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// Storage backend choice.
    pub storage: BackendChoice,
    /// How often the reconcile loop runs.
    pub reconcile_interval: Duration,
    /// Where built images are (default `<data_dir>/images`).
    pub images_dir: PathBuf,
    /// Sandbox networking; None gives guests no network card.
    pub network: Option<atelier_net::NetConfig>,
    /// How sandboxes' URLs look (the proxy's public side).
    pub urls: UrlBase,
    /// How often prebuilds are checked for new commits.
    pub prebuild_check_interval: Duration,
    /// Deadline of a request to a guest agent (and of a stream's start).
    pub agent_timeout: Duration,
    /// Default deadline of a QMP command to a VMM.
    pub qmp_timeout: Duration,
    /// Host folders (and everything under them) sandboxes may share
    /// (`--share-root`); default [`crate::shares::DEFAULT_SHARE_ROOTS`].
    pub share_roots: Vec<PathBuf>,
}

/// The public side of the proxy: `{scheme}://sandbox-{id}.{domain}{:port}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlBase {
    /// Wildcard domain (`localhost` for local use).
    pub domain: String,
    /// `https` when TLS is on, else `http`.
    pub scheme: String,
    /// Port, when not the scheme's default.
    pub port: Option<u16>,
}

impl UrlBase {
    /// The URL of host `label.{domain}`.
    pub fn url(&self, label: &str) -> String {
        match self.port {
            Some(p) => format!("{}://{label}.{}:{p}/", self.scheme, self.domain),
            None => format!("{}://{label}.{}/", self.scheme, self.domain),
        }
    }
}

impl ManagerConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir: PathBuf = data_dir.into();
        ManagerConfig {
            images_dir: data_dir.join("images"),
            data_dir,
            accel: AccelChoice::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            storage: BackendChoice::Auto,
            reconcile_interval: Duration::from_secs(30),
            network: Some(atelier_net::NetConfig::new()),
            prebuild_check_interval: Duration::from_secs(1800),
            agent_timeout: atelier_agent_proto::DEFAULT_TIMEOUT,
            qmp_timeout: atelier_vmm::qmp::DEFAULT_QMP_TIMEOUT,
            urls: UrlBase {
                domain: "localhost".into(),
                scheme: "http".into(),
                port: Some(7777),
            },
            share_roots: crate::shares::DEFAULT_SHARE_ROOTS
                .iter()
                .map(PathBuf::from)
                .collect(),
        }
    }

    /// Directory of built images.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir.clone()
    }

    /// Directory holding one directory per sandbox.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }
}
