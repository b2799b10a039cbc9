//! Sandboxes: their life cycle over the manager's services. Where to look:
//! - `create.rs`: a sandbox is created or started (record, disk, VM, network);
//! - `lifecycle.rs`: its VM is registered and watched, stopped, deleted;
//! - `snapshot.rs`: pause, resume and fork (saved VM state);
//! - `halt.rs`: stopping a hung VM, and a delete that never waits behind one;
//! - [`Sandboxes`]: the narrow handle other services (tasks) use.
//!
//! VMs start in [`crate::vms`]; host resources are recorded and reclaimed by
//! [`crate::journal`]; a crash is recovered by `reconcile.rs`.

mod create;
mod halt;
mod handle;
mod lifecycle;
mod snapshot;

pub(crate) use create::GuestSetup;
pub use handle::{OpenCodeEndpoint, Sandboxes};
