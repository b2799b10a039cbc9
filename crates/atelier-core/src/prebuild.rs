//! A prebuild's life: `building`, then `ready` or `failed`, and nothing after.
//! Staleness (a repo's branch moved on, or the workspace changed) is a flag on a
//! ready prebuild, shown to users as `stale`.

use serde::{Deserialize, Serialize};

/// Where a prebuild is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrebuildStatus {
    /// Booting, cloning, running init commands or snapshotting.
    Building,
    /// Snapshotted; sandboxes of its workspace spawn from it.
    Ready,
    /// The build failed (or the manager stopped during it); its log is kept.
    Failed,
}

impl PrebuildStatus {
    /// Every status.
    pub const ALL: [PrebuildStatus; 3] = [
        PrebuildStatus::Building,
        PrebuildStatus::Ready,
        PrebuildStatus::Failed,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            PrebuildStatus::Building => "building",
            PrebuildStatus::Ready => "ready",
            PrebuildStatus::Failed => "failed",
        }
    }

    /// The status named `s`, if it is one.
    pub fn parse(s: &str) -> Option<PrebuildStatus> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The legal moves: a build ends ready or failed, once.
    pub fn can_transition_to(self, to: PrebuildStatus) -> bool {
        matches!(
            (self, to),
            (PrebuildStatus::Building, PrebuildStatus::Ready)
                | (PrebuildStatus::Building, PrebuildStatus::Failed)
        )
    }

    /// What users see: a ready prebuild flagged stale shows as `stale`.
    pub fn shown(self, stale: bool) -> &'static str {
        match self {
            PrebuildStatus::Ready if stale => "stale",
            other => other.as_str(),
        }
    }
}

impl std::fmt::Display for PrebuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_ends_once_and_names_round_trip() {
        use PrebuildStatus::*;
        for s in PrebuildStatus::ALL {
            assert_eq!(PrebuildStatus::parse(s.as_str()), Some(s));
            for to in PrebuildStatus::ALL {
                assert_eq!(
                    s.can_transition_to(to),
                    s == Building && to != Building,
                    "{s} -> {to}"
                );
            }
        }
        assert_eq!(PrebuildStatus::parse("stale"), None);
        assert_eq!(Ready.shown(true), "stale");
        assert_eq!(Failed.shown(true), "failed");
    }
}
