use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Fewest vCPUs a sandbox may have.
pub const MIN_VCPUS: u32 = 1;
/// Most vCPUs a sandbox may have.
pub const MAX_VCPUS: u32 = 8;
/// Least guest memory, in MiB.
pub const MIN_MEMORY_MIB: u32 = 512;
/// Most guest memory, in MiB (16 GiB).
pub const MAX_MEMORY_MIB: u32 = 16 * 1024;

/// A sandbox id: `sb-` and 10 lowercase base-36 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SandboxId(String);

impl SandboxId {
    /// A fresh random id.
    pub fn generate() -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let tail: String = (0..10)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        SandboxId(format!("sb-{tail}"))
    }

    /// Parses an id, accepting only the exact generated form.
    pub fn parse(s: &str) -> Option<Self> {
        let tail = s.strip_prefix("sb-")?;
        (tail.len() == 10
            && tail
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .then(|| SandboxId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a sandbox is in its life. Stored as text; transitions are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Resources are being made and the VM is booting.
    Creating,
    /// The VM is up and its agent answered.
    Running,
    /// The VM is shutting down.
    Stopping,
    /// The VM is off; its disk is kept.
    Stopped,
    /// Something broke; resources have been (or are being) reclaimed except the disk.
    Failed,
    /// Resources are being removed.
    Deleting,
    /// Memory and device state are saved to disk and the VMM is gone; resume
    /// restores it exactly where it was.
    Paused,
    /// Gone; only the history row remains.
    Deleted,
}

impl SandboxState {
    /// Every state, in life order.
    pub const ALL: [SandboxState; 8] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Failed,
        SandboxState::Deleting,
        SandboxState::Deleted,
        SandboxState::Paused,
    ];

    /// Text form, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
            SandboxState::Deleting => "deleting",
            SandboxState::Deleted => "deleted",
            SandboxState::Paused => "paused",
        }
    }

    /// Whether the state machine allows going from `self` to `next`.
    pub fn can_transition_to(self, next: SandboxState) -> bool {
        use SandboxState::*;
        match self {
            // Paused: a resume that failed or was interrupted keeps its saved state.
            Creating => matches!(next, Running | Failed | Deleting | Paused),
            Running => matches!(next, Stopping | Failed | Deleting | Paused),
            Stopping => matches!(next, Stopped | Failed | Deleting),
            // A stopped sandbox starts again through Creating (boot from its kept disk).
            Stopped => matches!(next, Creating | Deleting),
            Failed => matches!(next, Creating | Deleting),
            Deleting => matches!(next, Deleted | Failed),
            // Resume goes back through Creating (the VMM is started again).
            Paused => matches!(next, Creating | Deleting | Failed),
            Deleted => false,
        }
    }

    /// Whether a VM process may exist in this state.
    pub fn has_vm(self) -> bool {
        use SandboxState::*;
        match self {
            Creating | Running | Stopping | Deleting => true,
            Stopped | Failed | Deleted | Paused => false,
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ValidationError::new("state", format!("unknown state {s:?}")))
    }
}

/// The operation in flight on a sandbox, recorded with the state it runs in so that
/// after a crash reconcile knows what was interrupted (and so what it may reclaim)
/// without reading any free text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxOp {
    /// A first boot (or the new sandbox of a fork): it owns its fresh disk.
    Create,
    /// A boot from the sandbox's kept disk: the disk is the user's.
    Start,
    /// A restore from its saved memory: disk and saved state are the user's.
    Resume,
    /// Its memory and disk are being copied into a new sandbox; the VM may be
    /// stopped (not running guest code) until the copy ends.
    Fork,
    /// Its memory is being saved to disk; the VM may be stopped until then.
    Pause,
    /// It is shutting down.
    Stop,
    /// Its resources are being removed.
    Delete,
}

impl SandboxOp {
    /// Every operation.
    pub const ALL: [SandboxOp; 7] = [
        SandboxOp::Create,
        SandboxOp::Start,
        SandboxOp::Resume,
        SandboxOp::Fork,
        SandboxOp::Pause,
        SandboxOp::Stop,
        SandboxOp::Delete,
    ];

    /// Text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxOp::Create => "create",
            SandboxOp::Start => "start",
            SandboxOp::Resume => "resume",
            SandboxOp::Fork => "fork",
            SandboxOp::Pause => "pause",
            SandboxOp::Stop => "stop",
            SandboxOp::Delete => "delete",
        }
    }

    /// The state a sandbox is in while this operation runs on it.
    pub fn runs_in(self) -> SandboxState {
        match self {
            SandboxOp::Create | SandboxOp::Start | SandboxOp::Resume => SandboxState::Creating,
            SandboxOp::Fork | SandboxOp::Pause => SandboxState::Running,
            SandboxOp::Stop => SandboxState::Stopping,
            SandboxOp::Delete => SandboxState::Deleting,
        }
    }

    /// Whether a sandbox in state `from` may begin this operation.
    pub fn may_begin_from(self, from: SandboxState) -> bool {
        use SandboxState::*;
        match self {
            SandboxOp::Create => false, // only a new row begins with create
            SandboxOp::Start => matches!(from, Stopped | Failed),
            SandboxOp::Resume => from == Paused,
            SandboxOp::Fork | SandboxOp::Pause | SandboxOp::Stop => from == Running,
            SandboxOp::Delete => !matches!(from, Deleted),
        }
    }
}

impl fmt::Display for SandboxOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxOp {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxOp::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| ValidationError::new("operation", format!("unknown operation {s:?}")))
    }
}

impl SandboxState {
    /// Whether this state exists only while an operation runs (a sandbox found in
    /// it after a crash was interrupted).
    pub fn in_flight(self) -> bool {
        use SandboxState::*;
        match self {
            Creating | Stopping | Deleting => true,
            Running | Stopped | Failed | Paused | Deleted => false,
        }
    }
}

/// What the user asks for when creating a sandbox, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Unique name among live sandboxes.
    pub name: String,
    /// Image name (e.g. `minimal`).
    pub image: String,
    /// Virtual CPUs, MIN_VCPUS..=MAX_VCPUS.
    pub vcpus: u32,
    /// Guest memory in MiB, MIN_MEMORY_MIB..=MAX_MEMORY_MIB.
    pub memory_mib: u32,
    /// Host folders shared into the guest.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Host user the VMM runs as when folders are shared, so files the guest writes
    /// belong to that user; None keeps the manager's user.
    #[serde(default)]
    pub mount_owner: Option<Owner>,
    /// Boot the kernel even when a memory snapshot could be restored.
    #[serde(default)]
    pub cold_boot: bool,
    /// What the guest may reach on the network.
    #[serde(default)]
    pub egress: crate::EgressPolicy,
    /// Spawn from this workspace's newest ready prebuild (its shape and egress
    /// policy replace the ones above).
    #[serde(default)]
    pub workspace: Option<String>,
}

/// Most host folders one sandbox may share.
pub const MAX_MOUNTS: usize = 8;

/// A host folder shared into the guest (virtio-9p).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// Absolute host path of an existing directory.
    pub source: String,
    /// Absolute path in the guest.
    pub target: String,
    /// Refuse writes (enforced by the host side).
    #[serde(default)]
    pub read_only: bool,
}

/// A host uid/gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn check_abs(field: &'static str, p: &str) -> Result<(), ValidationError> {
    let ok = p.starts_with('/')
        && p.len() <= crate::workspace::MAX_PATH_LEN
        && !p.contains('\0')
        && !p.split('/').any(|c| c == "..")
        && p != "/";
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{p:?} must be an absolute path other than / without '..'"),
        ))
    }
}

impl MountSpec {
    /// Parses `HOST:GUEST[:ro]` (the CLI form); HOST is taken as given.
    pub fn parse(s: &str) -> Result<MountSpec, ValidationError> {
        let mut parts = s.split(':');
        let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
            return Err(ValidationError::new(
                "mounts",
                format!("{s:?} is not HOST:GUEST[:ro]"),
            ));
        };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(o) => {
                return Err(ValidationError::new(
                    "mounts",
                    format!("{o:?} in {s:?}: use ro or rw"),
                ));
            }
        };
        if parts.next().is_some() {
            return Err(ValidationError::new(
                "mounts",
                format!("{s:?} is not HOST:GUEST[:ro]"),
            ));
        }
        Ok(MountSpec {
            source: source.into(),
            target: target.into(),
            read_only,
        })
    }
}

impl SandboxSpec {
    /// Checks every field, returning the first that is wrong.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(&self.name)?;
        validate_name(&self.image).map_err(|e| ValidationError::new("image", e.reason))?;
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ValidationError::new(
                "vcpus",
                format!(
                    "{} is out of range; use {MIN_VCPUS} to {MAX_VCPUS}",
                    self.vcpus
                ),
            ));
        }
        if self.mounts.len() > MAX_MOUNTS {
            return Err(ValidationError::new(
                "mounts",
                format!("at most {MAX_MOUNTS} mounts"),
            ));
        }
        for (i, m) in self.mounts.iter().enumerate() {
            check_abs("mounts.source", &m.source)?;
            check_abs("mounts.target", &m.target)?;
            if self.mounts[..i].iter().any(|o| o.target == m.target) {
                return Err(ValidationError::new(
                    "mounts.target",
                    format!("{} is mounted twice", m.target),
                ));
            }
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ValidationError::new(
                "memory_mib",
                format!(
                    "{} MiB is out of range; use {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            ));
        }
        self.egress.validate()
    }
}

/// Longest sandbox (and workspace) name: a DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// The rule of [`validate_name`] as a regular expression (valid in ECMA 262, the
/// dialect of JSON Schema, and in Rust's `regex`), for API schemas. Only the
/// exclusion of names that look like a sandbox id is not in it.
pub const NAME_PATTERN: &str = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";

/// Checks a sandbox name: 1-63 characters of `a-z`, `0-9` and `-`, starting with a
/// letter and not ending with `-` (a DNS label, since names appear in host names).
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let bad = |reason: &str| Err(ValidationError::new("name", format!("{name:?} {reason}")));
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("must be 1 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("may contain only lowercase letters, digits and '-'");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return bad("must start with a lowercase letter");
    }
    if name.ends_with('-') {
        return bad("must not end with '-'");
    }
    if name.starts_with("sb-") && SandboxId::parse(name).is_some() {
        return bad("looks like a sandbox id; pick another name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{SandboxOp, SandboxState};

    #[test]
    fn every_operation_runs_in_a_state_it_can_reach() {
        for op in SandboxOp::ALL {
            assert_eq!(op.as_str().parse::<SandboxOp>().ok(), Some(op));
            for from in SandboxState::ALL {
                if op.may_begin_from(from) && from != op.runs_in() {
                    assert!(
                        from.can_transition_to(op.runs_in()),
                        "{op} may begin from {from} but {from} cannot become {}",
                        op.runs_in()
                    );
                }
            }
        }
        // Every in-flight state has an operation that runs in it.
        for st in SandboxState::ALL.into_iter().filter(|s| s.in_flight()) {
            assert!(SandboxOp::ALL.iter().any(|op| op.runs_in() == st), "{st}");
        }
    }

    use super::*;

    #[test]
    fn ids_round_trip_and_reject_junk() {
        let id = SandboxId::generate();
        assert_eq!(SandboxId::parse(id.as_str()), Some(id.clone()));
        assert!(SandboxId::parse("sb-short").is_none());
        assert!(SandboxId::parse("xx-abcdefghij").is_none());
        assert!(SandboxId::parse("sb-ABCDEFGHIJ").is_none());
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(validate_name("demo").is_ok());
        assert!(validate_name("a-1").is_ok());
        for bad in [
            "",
            "Demo",
            "1abc",
            "a_b",
            "abc-",
            "a b",
            &"a".repeat(64),
            "sb-abcdefghij",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn spec_limits() {
        let ok = SandboxSpec {
            name: "x".into(),
            image: "minimal".into(),
            vcpus: 2,
            memory_mib: 1024,
            mounts: vec![],
            mount_owner: None,
            cold_boot: false,
            egress: Default::default(),
            workspace: None,
        };
        assert!(ok.validate().is_ok());
        for (v, m, field) in [
            (0, 1024, "vcpus"),
            (99, 1024, "vcpus"),
            (1, 10, "memory_mib"),
            (1, 1 << 20, "memory_mib"),
        ] {
            let err = SandboxSpec {
                vcpus: v,
                memory_mib: m,
                ..ok.clone()
            }
            .validate()
            .unwrap_err();
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn mounts_parse_and_validate() {
        let m = MountSpec::parse("/home/u/app:/workspace:ro").unwrap();
        assert_eq!(
            (m.source.as_str(), m.target.as_str(), m.read_only),
            ("/home/u/app", "/workspace", true)
        );
        assert!(!MountSpec::parse("/a:/b").unwrap().read_only);
        assert!(MountSpec::parse("/a").is_err());
        assert!(MountSpec::parse("/a:/b:rx").is_err());
        let spec = |mounts: Vec<MountSpec>| SandboxSpec {
            name: "x".into(),
            image: "minimal".into(),
            vcpus: 1,
            memory_mib: 512,
            mounts,
            mount_owner: None,
            cold_boot: false,
            egress: Default::default(),
            workspace: None,
        };
        assert!(
            spec(vec![MountSpec::parse("/a:/w").unwrap()])
                .validate()
                .is_ok()
        );
        for bad in ["rel:/w", "/a:rel", "/a:/", "/a/../etc:/w", "/a:/w/../x"] {
            assert!(
                spec(vec![MountSpec::parse(bad).unwrap()])
                    .validate()
                    .is_err(),
                "{bad}"
            );
        }
        let twice = vec![
            MountSpec::parse("/a:/w").unwrap(),
            MountSpec::parse("/b:/w").unwrap(),
        ];
        assert!(spec(twice).validate().is_err());
    }

    #[test]
    fn state_text_round_trips_and_deleted_is_terminal() {
        for st in SandboxState::ALL {
            assert_eq!(st.as_str().parse::<SandboxState>().unwrap(), st);
            assert!(!SandboxState::Deleted.can_transition_to(st));
        }
        assert!(SandboxState::Creating.can_transition_to(SandboxState::Running));
        assert!(!SandboxState::Stopped.can_transition_to(SandboxState::Running));
    }
}
