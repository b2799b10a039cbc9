//! The narrow handle over sandboxes that other services build on. A service that
//! needs sandboxes (tasks first) holds a [`Sandboxes`], never the manager: it can
//! create one from a workspace, run commands and open byte streams in it, pause,
//! resume, stop and delete it, and nothing else. How sandboxes run stays behind
//! it: today local QEMU VMs; another runtime (e.g. Kubernetes pods with Kata
//! Containers) would answer the same calls (see docs/architecture.md).

use std::sync::Arc;

use atelier_agent_proto::{ExecOutput, ExecRequest, GuestStream};
use atelier_core::SandboxSpec;
use atelier_store::SandboxRecord;

use crate::Error;
use crate::manager::Manager;

/// Where the warm OpenCode server of a sandbox listens (inside the guest, on
/// `127.0.0.1`; reach it with [`Sandboxes::stream`]). `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenCodeEndpoint {
    /// Guest port.
    pub port: u16,
    /// Server password (HTTP Basic, user `opencode`).
    pub password: String,
    /// OpenCode's version, as it reported when the prebuild was made.
    pub version: String,
    /// The directory its instance was warmed for (the workspace's first repo):
    /// run sessions there (`x-opencode-directory`).
    pub directory: String,
}

impl std::fmt::Debug for OpenCodeEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeEndpoint")
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .field("version", &self.version)
            .field("directory", &self.directory)
            .finish()
    }
}

/// Sandboxes, as other services see them.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    mgr: Arc<Manager>,
}

impl Sandboxes {
    pub(crate) fn new(mgr: Arc<Manager>) -> Sandboxes {
        Sandboxes { mgr }
    }

    /// Creates a sandbox and returns once it runs (or its create failed and was
    /// cleaned up).
    pub async fn create(&self, spec: SandboxSpec) -> Result<SandboxRecord, Error> {
        self.mgr.create(spec, true).await
    }

    /// A live sandbox by id or name.
    pub async fn get(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        self.mgr.get(id_or_name).await
    }

    /// Stops a running sandbox (its disk is kept).
    pub async fn stop(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        self.mgr.stop(id_or_name).await
    }

    /// Boots a stopped sandbox again and returns once it runs.
    pub async fn start(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        self.mgr.start(id_or_name, true).await
    }

    /// Saves a running sandbox's memory to disk and frees its CPU and RAM.
    pub async fn pause(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        self.mgr.pause(id_or_name).await
    }

    /// Resumes a paused sandbox exactly where it was.
    pub async fn resume(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        self.mgr.resume(id_or_name).await
    }

    /// Deletes a sandbox and everything it holds on the host.
    pub async fn delete(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        self.mgr.delete(id_or_name).await
    }

    /// Runs a command to completion in a running sandbox (each output stream keeps
    /// its last 16 MiB). The guest kills it at the
    /// request's timeout (an hour when it has none); the host gives up a little
    /// after that too.
    pub async fn exec(&self, id_or_name: &str, req: ExecRequest) -> Result<ExecOutput, Error> {
        let (_, agent) = self.mgr.agent(id_or_name).await?;
        crate::templates::run_to_end(&agent, req).await
    }

    /// Writes a file in a running sandbox.
    pub async fn write_file(
        &self,
        id_or_name: &str,
        path: &str,
        mode: u32,
        data: &[u8],
    ) -> Result<(), Error> {
        let (_, agent) = self.mgr.agent(id_or_name).await?;
        agent
            .write_file(path, mode, data)
            .await
            .map(|_| ())
            .map_err(Manager::agent_error)
    }

    /// Copies a file out of a running sandbox into `dest` on the host, refusing
    /// files larger than `max` bytes (the partial copy is removed).
    pub async fn copy_out(
        &self,
        id_or_name: &str,
        path: &str,
        dest: &std::path::Path,
        max: u64,
    ) -> Result<u64, Error> {
        use futures::StreamExt;
        use std::io::Write;
        let (_, agent) = self.mgr.agent(id_or_name).await?;
        let mut stream = agent.read_file(path).await.map_err(Manager::agent_error)?;
        let mut file = std::fs::File::create(dest)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", dest.display())))?;
        let mut total = 0u64;
        let result = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(Manager::agent_error)?;
                total += chunk.len() as u64;
                if total > max {
                    return Err(Error::new(
                        atelier_core::ErrorKind::ResourceExhausted,
                        format!("{path} in the sandbox is larger than {max} bytes"),
                    ));
                }
                file.write_all(&chunk)
                    .map_err(|e| Error::internal(format!("writing {}: {e}", dest.display())))?;
            }
            Ok(total)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
    }

    /// Opens a byte stream to `127.0.0.1:port` inside a running sandbox.
    pub async fn stream(&self, id_or_name: &str, port: u16) -> Result<GuestStream, Error> {
        self.mgr.guest_stream(id_or_name, port).await
    }

    /// The OpenCode server of a sandbox spawned from a prebuild that has one
    /// (`None` otherwise). When [`Sandboxes::create`] returns for such a sandbox,
    /// the workspace's provider keys are handed over and OpenCode answers.
    pub async fn opencode(&self, id_or_name: &str) -> Result<Option<OpenCodeEndpoint>, Error> {
        let rec = self.mgr.get(id_or_name).await?;
        Ok(self
            .mgr
            .store
            .sandbox_opencode(&rec.id)
            .await?
            .map(|oc| OpenCodeEndpoint {
                port: oc.port,
                password: oc.password,
                version: oc.version,
                directory: oc.directory,
            }))
    }

    /// The event bus every sandbox change is published on.
    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        self.mgr.events()
    }
}
