//! Egress policy: which outside hosts a sandbox may reach.
//!
//! The policy is enforced by name, not by address: the guests' DNS forwarder only
//! resolves allowed names and, as it answers, adds the returned addresses to the
//! sandbox's firewall set. A policy therefore lists DNS names ([`DomainPattern`]),
//! never IP literals, so that "allowed" always means "a name the user wrote down".

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ValidationError;

/// Most entries an allow-list may hold; bounds the firewall set and per-query matching.
pub const MAX_EGRESS_DOMAINS: usize = 256;

/// Longest DNS name in its text form without the trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Field name used in validation errors, as in the API.
const FIELD: &str = "egress";

/// What a sandbox may reach outside the host.
///
/// JSON form (serde's external tagging, kebab-case): `"allow-all"`, `"deny-all"`, or
/// `{"allow": ["github.com", "*.pypi.org"]}`. The CLI form ([`FromStr`] and
/// [`Display`](fmt::Display)) is `allow-all`, `deny-all`, or a comma-separated list
/// `github.com,*.pypi.org`, optionally prefixed with `allow:`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EgressPolicy {
    /// Any destination; the default, so sandboxes behave like ordinary machines unless
    /// the user asks for a restriction.
    #[default]
    AllowAll,
    /// No destination outside the host; DNS is refused too.
    DenyAll,
    /// Only the names matching one of these patterns (and the addresses DNS returned
    /// for them). 1 to [`MAX_EGRESS_DOMAINS`] entries once validated.
    #[serde(rename = "allow")]
    AllowList(Vec<DomainPattern>),
}

impl EgressPolicy {
    /// A validated allow-list: non-empty, at most [`MAX_EGRESS_DOMAINS`] entries,
    /// duplicates removed (first occurrence kept).
    pub fn allow_list(
        patterns: impl IntoIterator<Item = DomainPattern>,
    ) -> Result<Self, ValidationError> {
        let mut list: Vec<DomainPattern> = Vec::new();
        for p in patterns {
            if !list.contains(&p) {
                list.push(p);
            }
        }
        let policy = EgressPolicy::AllowList(list);
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the invariants the type cannot enforce by itself (list length); the
    /// patterns are valid by construction.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            EgressPolicy::AllowAll | EgressPolicy::DenyAll => Ok(()),
            EgressPolicy::AllowList(list) if list.is_empty() => Err(ValidationError::new(
                FIELD,
                "the allow-list is empty; list at least one domain or use deny-all",
            )),
            EgressPolicy::AllowList(list) if list.len() > MAX_EGRESS_DOMAINS => {
                Err(ValidationError::new(
                    FIELD,
                    format!(
                        "the allow-list has {} entries; at most {MAX_EGRESS_DOMAINS} are allowed \
                         (use wildcards such as *.example.com)",
                        list.len()
                    ),
                ))
            }
            EgressPolicy::AllowList(_) => Ok(()),
        }
    }

    /// Whether a DNS lookup of `name` may be answered. Case-insensitive; a trailing dot
    /// is ignored. An (invalid) empty allow-list allows nothing.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            EgressPolicy::AllowAll => true,
            EgressPolicy::DenyAll => false,
            EgressPolicy::AllowList(list) => list.iter().any(|p| p.matches(name)),
        }
    }
}

impl fmt::Display for EgressPolicy {
    /// The CLI form. An allow-list is written without the `allow:` prefix, except when
    /// its only entry is literally `allow-all` or `deny-all` (both valid host names),
    /// so that the text always parses back to the same policy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressPolicy::AllowAll => f.write_str("allow-all"),
            EgressPolicy::DenyAll => f.write_str("deny-all"),
            EgressPolicy::AllowList(list) => {
                if let [only] = list.as_slice()
                    && matches!(only.as_str(), "allow-all" | "deny-all")
                {
                    f.write_str("allow:")?;
                }
                for (i, p) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    f.write_str(p.as_str())?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for EgressPolicy {
    type Err = ValidationError;

    /// Parses the CLI form: `allow-all`, `deny-all`, `github.com,*.pypi.org` or
    /// `allow:github.com,*.pypi.org`. Spaces around entries are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let list = match s {
            "allow-all" => return Ok(EgressPolicy::AllowAll),
            "deny-all" => return Ok(EgressPolicy::DenyAll),
            "" => {
                return Err(ValidationError::new(
                    FIELD,
                    "empty policy; use allow-all, deny-all or a comma-separated list of \
                     domains such as github.com,*.pypi.org",
                ));
            }
            _ => s.strip_prefix("allow:").unwrap_or(s),
        };
        if list.trim().is_empty() {
            return Err(ValidationError::new(
                FIELD,
                "the allow-list is empty; list at least one domain or use deny-all",
            ));
        }
        let patterns = list
            .split(',')
            .map(|entry| entry.trim().parse::<DomainPattern>())
            .collect::<Result<Vec<_>, _>>()?;
        EgressPolicy::allow_list(patterns)
    }
}

/// Deserialization goes through this shape and then [`EgressPolicy::allow_list`], so a
/// policy read from JSON (API body, DB row) is always validated.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum EgressPolicyRepr {
    AllowAll,
    DenyAll,
    #[serde(rename = "allow")]
    AllowList(Vec<DomainPattern>),
}

impl<'de> Deserialize<'de> for EgressPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match EgressPolicyRepr::deserialize(deserializer)? {
            EgressPolicyRepr::AllowAll => Ok(EgressPolicy::AllowAll),
            EgressPolicyRepr::DenyAll => Ok(EgressPolicy::DenyAll),
            EgressPolicyRepr::AllowList(list) => {
                EgressPolicy::allow_list(list).map_err(serde::de::Error::custom)
            }
        }
    }
}

/// One allow-list entry: an exact host name (`github.com` matches only `github.com`)
/// or a wildcard (`*.pypi.org` matches any name strictly under `pypi.org`, not
/// `pypi.org` itself — list both if both are wanted).
///
/// Always lowercase and without a trailing dot; built only through [`FromStr`] or
/// deserialization, which validate it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(into = "String")]
#[schema(value_type = String, example = "*.pypi.org")]
pub struct DomainPattern(String);

impl DomainPattern {
    /// The canonical text, e.g. `*.pypi.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a `*.` wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// Whether `name` (as asked in a DNS query) is covered. Case-insensitive; one
    /// trailing dot is ignored.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self.0.strip_prefix("*.") {
            Some(suffix) => {
                // Strictly under: at least one label, then a dot, then the suffix.
                let Some(split) = name.len().checked_sub(suffix.len() + 1) else {
                    return false;
                };
                if split == 0 || !name.is_char_boundary(split) {
                    return false;
                }
                let (head, tail) = name.split_at(split);
                tail.starts_with('.')
                    && tail[1..].eq_ignore_ascii_case(suffix)
                    && !head.ends_with('.')
            }
            None => name.eq_ignore_ascii_case(&self.0),
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<DomainPattern> for String {
    fn from(p: DomainPattern) -> String {
        p.0
    }
}

impl TryFrom<String> for DomainPattern {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for DomainPattern {
    type Err = ValidationError;

    /// Validates and normalises one entry: lowercased, one trailing dot removed;
    /// labels of 1 to 63 characters of `a-z0-9-` not starting or ending with `-`; at
    /// most 253 characters; `*` only as the whole first label and followed by at least
    /// two labels; no IP addresses.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            Err(ValidationError::new(
                FIELD,
                format!("{s:?} is not a valid domain pattern: {why}"),
            ))
        };
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() {
            return bad("it is empty; write a name such as github.com or *.pypi.org");
        }
        if name.len() > MAX_NAME_LEN {
            return bad("it is longer than 253 characters");
        }
        if name.parse::<Ipv4Addr>().is_ok() || name.contains(':') {
            return bad("IP addresses are not allowed; list the host name instead");
        }
        let (wildcard, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let labels: Vec<&str> = rest.split('.').collect();
        for label in &labels {
            if label.contains('*') {
                return bad("'*' is only allowed as the whole first label, as in *.pypi.org");
            }
            if label.is_empty() {
                return bad("it has an empty label (two dots in a row, or a leading dot)");
            }
            if label.len() > MAX_LABEL_LEN {
                return bad("a label is longer than 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return bad("labels may contain only letters, digits and '-'");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label starts or ends with '-'");
            }
        }
        if wildcard && labels.len() < 2 {
            return bad("a wildcard needs at least two labels after '*.', as in *.pypi.org");
        }
        // A numeric last label means an address in one of inet_aton's short forms
        // (`10.1`, `0x7f.1`-style decimals): no real top-level domain is all digits.
        if labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return bad("IP addresses are not allowed; list the host name instead");
        }
        Ok(DomainPattern(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> DomainPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_pattern_matches_only_itself() {
        let p = pat("github.com");
        assert!(p.matches("github.com"));
        assert!(p.matches("GitHub.COM"));
        assert!(p.matches("github.com."));
        assert!(!p.matches("api.github.com"));
        assert!(!p.matches("github.co"));
        assert!(!p.matches("xgithub.com"));
        assert!(!p.matches(""));
        assert!(!p.is_wildcard());
    }

    #[test]
    fn wildcard_matches_strictly_under() {
        let p = pat("*.pypi.org");
        assert!(p.is_wildcard());
        assert!(p.matches("files.pypi.org"));
        assert!(p.matches("a.b.pypi.org"));
        assert!(p.matches("FILES.PyPI.org."));
        assert!(!p.matches("pypi.org"));
        assert!(!p.matches("pypi.org."));
        assert!(!p.matches(".pypi.org"));
        assert!(!p.matches("evilpypi.org"));
        assert!(!p.matches("pypi.org.evil.com"));
        assert!(!p.matches("a..pypi.org"));
    }

    #[test]
    fn matching_non_ascii_names_does_not_panic() {
        let p = pat("*.pypi.org");
        let _ = p.matches("é.pypi.org");
        assert!(!p.matches("éépypi.org"));
        assert!(!pat("a.bc").matches("éa.bc"));
    }

    #[test]
    fn patterns_are_normalised() {
        assert_eq!(pat("GitHub.com.").as_str(), "github.com");
        assert_eq!(pat("*.PyPI.org").as_str(), "*.pypi.org");
        assert_eq!(pat("localhost").as_str(), "localhost");
        assert_eq!(pat("a-b.c0").as_str(), "a-b.c0");
    }

    #[test]
    fn bad_patterns_are_rejected_with_the_entry_named() {
        for bad in [
            "",
            ".",
            "a..b",
            ".github.com",
            "github.com..",
            "*",
            "*.",
            "*.org",
            "*.*.org",
            "a*.pypi.org",
            "files.*.org",
            "**.pypi.org",
            "-a.com",
            "a-.com",
            "a_b.com",
            "a b.com",
            "ex%ample.com",
            "1.2.3.4",
            "10.1",
            "127.0.0.1.",
            "::1",
            "[::1]",
            "github.com:443",
            "https://github.com",
            "é.com",
        ] {
            let err = bad.parse::<DomainPattern>().unwrap_err();
            assert_eq!(err.field, "egress");
            assert!(
                err.reason.contains(&format!("{bad:?}")),
                "{bad:?}: {}",
                err.reason
            );
        }
    }

    #[test]
    fn length_limits() {
        let label63 = "a".repeat(63);
        assert!(format!("{label63}.com").parse::<DomainPattern>().is_ok());
        assert!(format!("a{label63}.com").parse::<DomainPattern>().is_err());
        // 4 * 63 + 3 dots = 255 > 253
        let long = [label63.as_str(); 4].join(".");
        assert!(long.parse::<DomainPattern>().is_err());
        // 3 * 63 + 61 + 3 dots = 253
        let ok = format!("{}.{}", [label63.as_str(); 3].join("."), "a".repeat(61));
        assert_eq!(ok.len(), 253);
        assert!(ok.parse::<DomainPattern>().is_ok());
        assert!(format!("{ok}.").parse::<DomainPattern>().is_ok());
    }

    #[test]
    fn policy_parses_cli_forms() {
        assert_eq!(
            "allow-all".parse::<EgressPolicy>().unwrap(),
            EgressPolicy::AllowAll
        );
        assert_eq!(
            " deny-all ".parse::<EgressPolicy>().unwrap(),
            EgressPolicy::DenyAll
        );
        let expected = EgressPolicy::AllowList(vec![pat("github.com"), pat("*.pypi.org")]);
        assert_eq!(
            "github.com,*.pypi.org".parse::<EgressPolicy>().unwrap(),
            expected
        );
        assert_eq!(
            "allow:github.com, *.pypi.org"
                .parse::<EgressPolicy>()
                .unwrap(),
            expected
        );
        assert_eq!(
            "github.com,GITHUB.com.,*.pypi.org"
                .parse::<EgressPolicy>()
                .unwrap(),
            expected
        );
    }

    #[test]
    fn policy_rejects_bad_cli_forms() {
        for bad in [
            "",
            "allow:",
            "allow: ",
            "github.com,",
            ",github.com",
            "github.com,,pypi.org",
            "github.com,1.2.3.4",
        ] {
            let err = bad.parse::<EgressPolicy>().unwrap_err();
            assert_eq!(err.field, "egress", "{bad:?}");
        }
        let err = "github.com,bad_name.org"
            .parse::<EgressPolicy>()
            .unwrap_err();
        assert!(err.reason.contains("\"bad_name.org\""), "{}", err.reason);
    }

    #[test]
    fn list_size_is_bounded() {
        let many: Vec<String> = (0..=MAX_EGRESS_DOMAINS)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        assert!(many.join(",").parse::<EgressPolicy>().is_err());
        assert!(
            many[..MAX_EGRESS_DOMAINS]
                .join(",")
                .parse::<EgressPolicy>()
                .is_ok()
        );
        assert!(EgressPolicy::AllowList(vec![]).validate().is_err());
        assert!(EgressPolicy::allow_list([]).is_err());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "allow-all",
            "deny-all",
            "github.com",
            "github.com,*.pypi.org",
            "allow:allow-all",
            "allow:deny-all",
            "allow-all,deny-all",
        ] {
            let policy: EgressPolicy = text.parse().unwrap();
            assert_eq!(policy.to_string(), text);
            assert_eq!(policy.to_string().parse::<EgressPolicy>().unwrap(), policy);
        }
        assert_eq!(
            "allow:allow-all".parse::<EgressPolicy>().unwrap(),
            EgressPolicy::AllowList(vec![pat("allow-all")])
        );
    }

    #[test]
    fn policy_allows() {
        assert!(EgressPolicy::default().allows("anything.example"));
        assert!(!EgressPolicy::DenyAll.allows("github.com"));
        let p: EgressPolicy = "github.com,*.pypi.org".parse().unwrap();
        assert!(p.allows("github.com."));
        assert!(p.allows("files.pypi.org"));
        assert!(!p.allows("pypi.org"));
        assert!(!p.allows("gitlab.com"));
        assert!(!EgressPolicy::AllowList(vec![]).allows("github.com"));
    }

    #[test]
    fn schema_is_one_of_three_forms() {
        use utoipa::openapi::{RefOr, Schema};
        let RefOr::T(Schema::OneOf(one_of)) = <EgressPolicy as utoipa::PartialSchema>::schema()
        else {
            panic!("EgressPolicy schema is not a oneOf");
        };
        // allow-all and deny-all (possibly merged into one string enum) and {allow: [..]}.
        assert!((2..=3).contains(&one_of.items.len()));
    }
}
