//! Domain types shared by every Atelier crate: sandbox identity, the sandbox state
//! machine, resource limits and the error kinds every layer maps its errors onto.
//!
//! This crate must not depend on any other Atelier crate, on tokio, or on anything
//! that touches the host.

pub mod egress;
mod error;
pub mod event;
mod prebuild;
mod sandbox;
pub mod task;
pub mod workspace;

pub use egress::{DomainPattern, EgressPolicy, MAX_EGRESS_DOMAINS};
pub use error::{ErrorKind, ValidationError};
pub use prebuild::PrebuildStatus;
pub use sandbox::{
    MAX_MEMORY_MIB, MAX_MOUNTS, MAX_NAME_LEN, MAX_VCPUS, MIN_MEMORY_MIB, MIN_VCPUS, MountSpec,
    NAME_PATTERN, Owner, SandboxId, SandboxOp, SandboxSpec, SandboxState, validate_name,
};
pub use workspace::{
    RepoSpec, Resources, SecretFile, SecretRef, WorkspaceDev, WorkspaceSecrets, WorkspaceSpec,
    validate_secret_name,
};
