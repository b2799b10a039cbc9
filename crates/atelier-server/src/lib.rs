//! The Atelier manager: the sandbox service (create, start, stop, delete, exec,
//! files), the resource journal and its reconcile loop, and the REST API over it.
//!
//! Host side effects go through their owners: VMM processes through `atelier-vmm`,
//! disks through `atelier-storage`, rows through `atelier-store`. This crate
//! orchestrates them and journals every resource before it is made.

pub mod api;
pub mod auth;
pub mod config;
pub mod dev;
mod error;
pub mod events;
mod fault;
pub mod guest_limits;
pub mod guest_stream;
mod host_files;
pub mod journal;
pub mod manager;
mod network;
pub mod opencode;
pub mod prebuild;
mod reconcile;
pub mod sandboxes;
pub mod secrets;
pub mod share_access;
pub mod shares;
pub mod tasks;
mod templates;
mod vms;
pub mod workspaces;

pub use error::Error;
pub use manager::{Manager, ManagerConfig};
pub use sandboxes::OpenCodeEndpoint;
