//! Dev commands: the specs live in the store (what should run), the agent runs and
//! supervises them (what does run), and the proxy's route table holds the ones
//! whose port answers. The agent pushes its dev commands' statuses whenever one
//! changes (it checks in the guest twice a second), so a route appears when the
//! server starts listening and disappears when it stops, with no host polling;
//! an agent from before that capability is asked once a second. After a cold boot
//! or an agent restart the stored commands are started again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atelier_agent_proto::{DevSpec, DevState, DevStatus};
use atelier_core::SandboxId;

use crate::Error;
use crate::manager::Manager;

/// Proxy routes: (sandbox, dev name) -> guest port, for listening dev commands.
pub(crate) type DevRoutes = HashMap<(SandboxId, String), u16>;

/// The route table, owned by the dev-command service.
#[derive(Debug, Default)]
pub(crate) struct Routes(std::sync::Mutex<DevRoutes>);

/// Most environment variables one dev command started through the API may set.
pub const MAX_DEV_ENV: usize = 256;

/// A name no dev command can have is one that does not exist: not found, without
/// asking the guest.
pub fn no_such_name(name: &str) -> Result<(), Error> {
    if atelier_agent_proto::valid_dev_name(name) {
        return Ok(());
    }
    Err(Error::not_found(format!(
        "no dev command named {name:?} (names are 1-30 of a-z, 0-9 and '-', starting with a letter)"
    )))
}

/// Checks a spec before it is stored or sent.
pub fn validate_spec(spec: &DevSpec) -> Result<(), Error> {
    if !atelier_agent_proto::valid_dev_name(&spec.name) {
        return Err(Error::invalid(format!(
            "dev command name {:?}: use 1-30 of a-z, 0-9 and '-', starting with a letter",
            spec.name
        )));
    }
    if spec.command.trim().is_empty()
        || spec.command.len() > atelier_core::workspace::MAX_COMMAND_BYTES
    {
        return Err(Error::invalid(
            "dev command: command must be 1 byte to 16 KiB",
        ));
    }
    if spec.port == Some(0) {
        return Err(Error::invalid("dev command: port must be 1-65535"));
    }
    if let Some(cwd) = &spec.cwd
        && !cwd.starts_with('/')
    {
        return Err(Error::invalid(format!(
            "dev command: cwd {cwd:?} must be an absolute path"
        )));
    }
    if spec.env.len() > MAX_DEV_ENV
        || spec
            .env
            .iter()
            .any(|(k, _)| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(Error::invalid(
            "dev command: env names must be non-empty, without '=' (at most 256)",
        ));
    }
    Ok(())
}

impl Manager {
    /// Starts (or replaces) a dev command in a running sandbox and remembers it, so it
    /// runs again after a restart.
    pub async fn dev_start(&self, id_or_name: &str, spec: DevSpec) -> Result<DevStatus, Error> {
        validate_spec(&spec)?;
        let (rec, agent) = self.agent(id_or_name).await?;
        let json = serde_json::to_string(&spec).map_err(|e| Error::internal(e.to_string()))?;
        self.store
            .put_dev_command(&rec.id, &spec.name, &json)
            .await?;
        agent
            .dev_start(spec.clone())
            .await
            .map_err(Manager::agent_error)?;
        tracing::info!(sandbox = %rec.id, dev = %spec.name, "dev command started");
        self.refresh_dev_routes(&rec.id).await;
        self.dev_status(&rec.id, &spec.name).await
    }

    /// Stops a dev command and forgets it (its logs stay readable).
    pub async fn dev_stop(&self, id_or_name: &str, name: &str) -> Result<DevStatus, Error> {
        let (rec, agent) = self.agent(id_or_name).await?;
        no_such_name(name)?;
        let known = self.store.delete_dev_command(&rec.id, name).await?;
        match agent.dev_stop(name).await {
            Err(e) if !known => return Err(Manager::agent_error(e)),
            Err(e) => tracing::warn!(sandbox = %rec.id, dev = name, error = %e, "dev stop"),
            Ok(()) => {}
        }
        let mut rest: HashMap<String, u16> = self
            .dev_routes()
            .iter()
            .filter(|((s, _), _)| *s == rec.id)
            .map(|((_, n), p)| (n.clone(), *p))
            .collect();
        rest.remove(name);
        self.set_dev_routes(&rec.id, rest);
        self.dev_status(&rec.id, name).await
    }

    /// Statuses of a sandbox's dev commands, as the agent reports them.
    pub async fn dev_list(&self, id_or_name: &str) -> Result<Vec<DevStatus>, Error> {
        let (_rec, agent) = self.agent(id_or_name).await?;
        agent.dev_list().await.map_err(Manager::agent_error)
    }

    async fn dev_status(&self, id: &SandboxId, name: &str) -> Result<DevStatus, Error> {
        let (_rec, agent) = self.agent(id.as_str()).await?;
        agent
            .dev_list()
            .await
            .map_err(Manager::agent_error)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::not_found(format!("no dev command named {name:?}")))
    }

    /// The proxy's upstream for `dev-{name}-{id}`, if that dev command listens.
    pub fn dev_upstream(&self, id: &SandboxId, name: &str) -> Option<SocketAddr> {
        let port = *self.dev_routes().get(&(id.clone(), name.to_owned()))?;
        self.upstream(id, port)
    }

    /// The URL of a dev command through the proxy.
    pub fn dev_url(&self, id: &SandboxId, name: &str) -> Option<String> {
        self.net
            .as_ref()
            .map(|_| self.cfg.urls.url(&format!("dev-{name}-{id}")))
    }

    /// Re-reads a sandbox's dev commands from its agent (for an agent that does not
    /// push them) and applies them.
    pub(crate) async fn refresh_dev_routes(&self, id: &SandboxId) {
        let Some(vm) = self.vms.get(id) else {
            self.set_dev_routes(id, HashMap::new());
            return;
        };
        let Ok(statuses) = vm.agent().dev_list().await else {
            return;
        };
        if self.apply_dev_statuses(id, &vm, &statuses).await
            && let Ok(s) = vm.agent().dev_list().await
        {
            self.apply_dev_statuses(id, &vm, &s).await;
        }
    }

    /// Follows the statuses a sandbox's agent pushes (capability `dev-events`) for
    /// as long as `vm` is the sandbox's VM.
    async fn follow_dev_changes(&self, id: &SandboxId, vm: Arc<crate::vms::RunningVm>) {
        let mut changes = vm.agent().dev_changes();
        loop {
            if !self.vms.get(id).is_some_and(|v| Arc::ptr_eq(&v, &vm)) {
                return;
            }
            let pushed = changes.borrow_and_update().clone();
            if let Some(statuses) = pushed {
                self.apply_dev_statuses(id, &vm, &statuses).await;
            }
            // Woken by the next push; the timeout only re-checks that the VM is
            // still this sandbox's.
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_secs(5), changes.changed()).await
            {
                return;
            }
        }
    }

    /// Routes for the listening dev commands; stored commands the agent does not
    /// run (cold boot, agent restart) are started again. True when it started any.
    async fn apply_dev_statuses(
        &self,
        id: &SandboxId,
        vm: &crate::vms::RunningVm,
        statuses: &[DevStatus],
    ) -> bool {
        let stored = self.store.dev_commands(Some(id)).await.unwrap_or_default();
        let mut restarted = false;
        for row in &stored {
            let present = statuses
                .iter()
                .any(|s| s.name == row.name && !matches!(s.state, DevState::Stopped));
            if present {
                continue;
            }
            let Ok(spec) = serde_json::from_str::<DevSpec>(&row.spec) else {
                tracing::warn!(sandbox = %id, dev = %row.name, "unreadable stored dev command");
                continue;
            };
            let spec = self.with_workspace_secrets(id, spec).await;
            match vm.agent().dev_start(spec).await {
                Ok(()) => {
                    tracing::info!(sandbox = %id, dev = %row.name, "dev command started again");
                    restarted = true;
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, dev = %row.name, error = %e, "cannot start dev command")
                }
            }
        }
        let mut routes = HashMap::new();
        for s in statuses {
            if let (true, Some(port)) = (s.listening && s.state != DevState::Stopped, s.port) {
                routes.insert(s.name.clone(), port);
            }
        }
        self.set_dev_routes(id, routes);
        restarted
    }

    pub(crate) fn dev_routes(&self) -> std::sync::MutexGuard<'_, DevRoutes> {
        crate::manager::lock_map(&self.dev_routes.0)
    }

    /// Replaces a sandbox's dev routes, publishing `dev.state` for each command
    /// whose URL starts or stops answering.
    pub(crate) fn set_dev_routes(&self, id: &SandboxId, new: HashMap<String, u16>) {
        let mut changes = Vec::new();
        {
            let mut routes = self.dev_routes();
            routes.retain(|(s, name), _| {
                let keep = s != id || new.contains_key(name);
                if !keep {
                    changes.push((name.clone(), false));
                }
                keep
            });
            for (name, port) in new {
                if routes.insert((id.clone(), name.clone()), port).is_none() {
                    changes.push((name, true));
                }
            }
        }
        for (name, up) in changes {
            let url = self.dev_url(id, &name).unwrap_or_default();
            self.events()
                .publish(atelier_core::event::EventKind::DevState {
                    sandbox: id.to_string(),
                    name,
                    up,
                    url,
                });
        }
    }

    /// Refreshes every online sandbox's routes once a second. Each sandbox's refresh
    /// runs on its own task with a deadline, at most one at a time per sandbox, so a
    /// hung guest delays only its own routes.
    pub(crate) fn spawn_dev_watcher(self: &Arc<Self>) {
        let me = Arc::clone(self);
        // A refresh is up to three agent requests, each with its own deadline.
        let limit = me.cfg.agent_timeout.saturating_mul(2);
        tokio::spawn(async move {
            let mut inflight: HashMap<SandboxId, tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let ids: Vec<SandboxId> =
                    me.net.as_ref().map(|n| n.online_ids()).unwrap_or_default();
                inflight.retain(|_, task| !task.is_finished());
                for id in &ids {
                    if inflight.contains_key(id) {
                        continue;
                    }
                    let Some(vm) = me.vms.get(id) else {
                        continue;
                    };
                    let (m, sid) = (Arc::clone(&me), id.clone());
                    // An agent that pushes its statuses is followed for the VM's
                    // life; an older one is asked once a second.
                    let task = if vm.agent().supports(atelier_agent_proto::CAP_DEV_EVENTS) {
                        tokio::spawn(async move { m.follow_dev_changes(&sid, vm).await })
                    } else {
                        tokio::spawn(async move {
                            if tokio::time::timeout(limit, m.refresh_dev_routes(&sid))
                                .await
                                .is_err()
                            {
                                tracing::warn!(sandbox = %sid, "dev routes not refreshed within {limit:?}; is the guest hung?");
                            }
                        })
                    };
                    inflight.insert(id.clone(), task);
                }
                let gone: Vec<SandboxId> = me
                    .dev_routes()
                    .keys()
                    .filter(|(s, _)| !ids.contains(s))
                    .map(|(s, _)| s.clone())
                    .collect();
                for id in gone {
                    me.set_dev_routes(&id, HashMap::new());
                }
            }
        });
    }
}
