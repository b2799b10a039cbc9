//! Which sandbox a request is for, decided from its Host header alone.

/// The target named by a proxied host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `sandbox-{id}.{domain}`: the sandbox's default web port.
    Sandbox {
        /// The sandbox id, `sb-` and 10 characters of `[a-z0-9]`.
        id: String,
    },
    /// `dev-{name}-{id}.{domain}`: a named dev server (port) inside the sandbox.
    Dev {
        /// The dev server's name.
        name: String,
        /// The sandbox id.
        id: String,
    },
}

/// Length of a sandbox id: `sb-` plus 10 characters.
const ID_LEN: usize = 13;
/// Longest accepted dev server name.
const NAME_MAX: usize = 30;

/// Parses a Host header (any case, optional port) for `domain`; `None` for anything that
/// is not exactly one well-formed proxy label directly under `domain`.
pub fn parse_host(host: &str, domain: &str) -> Option<Route> {
    let host = strip_port(host)?.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let label = host.strip_suffix(domain.as_str())?.strip_suffix('.')?;
    if label.contains('.') {
        return None;
    }
    if let Some(id) = label.strip_prefix("sandbox-") {
        return is_id(id).then(|| Route::Sandbox { id: id.to_owned() });
    }
    let rest = label.strip_prefix("dev-")?;
    // The id contains a hyphen itself, so split off exactly its length from the end.
    let split = rest.len().checked_sub(ID_LEN + 1)?;
    let (name, dash_id) = rest.split_at(split);
    let id = dash_id.strip_prefix('-')?;
    (is_name(name) && is_id(id)).then(|| Route::Dev {
        name: name.to_owned(),
        id: id.to_owned(),
    })
}

/// Removes a `:port` suffix, keeping bracketed IPv6 literals (which never route) intact.
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None;
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => Some(h),
        Some(_) => None,
        None => Some(host),
    }
}

fn is_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id.starts_with("sb-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn is_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=NAME_MAX).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && !name.ends_with('-')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str) -> Option<Route> {
        Some(Route::Sandbox { id: id.into() })
    }

    fn dev(name: &str, id: &str) -> Option<Route> {
        Some(Route::Dev {
            name: name.into(),
            id: id.into(),
        })
    }

    #[test]
    fn good_hosts() {
        let id = "sb-abc123xyz0";
        assert_eq!(
            parse_host("sandbox-sb-abc123xyz0.localhost", "localhost"),
            sandbox(id)
        );
        assert_eq!(
            parse_host("sandbox-sb-abc123xyz0.example.com:8443", "example.com"),
            sandbox(id)
        );
        assert_eq!(
            parse_host("SANDBOX-SB-ABC123XYZ0.Example.COM", "example.com"),
            sandbox(id)
        );
        assert_eq!(
            parse_host("sandbox-sb-abc123xyz0.atelier.test.", "atelier.test"),
            sandbox(id)
        );
        assert_eq!(
            parse_host("dev-web-sb-abc123xyz0.localhost:443", "localhost"),
            dev("web", id)
        );
        assert_eq!(
            parse_host("dev-my-app-2-sb-abc123xyz0.atelier.test", "atelier.test"),
            dev("my-app-2", id)
        );
        assert_eq!(
            parse_host("dev-a-sb-abc123xyz0.localhost", "LOCALHOST"),
            dev("a", id)
        );
        let long = "a".repeat(30);
        assert_eq!(
            parse_host(&format!("dev-{long}-{id}.localhost"), "localhost"),
            dev(&long, id)
        );
    }

    #[test]
    fn bad_hosts() {
        for host in [
            "",
            "localhost",
            "sandbox-sb-abc123xyz0.example.org", // wrong domain
            "sandbox-sb-abc123xyz0.notexample.com", // suffix but not a label boundary
            "sandbox-sb-abc123xyz0xexample.com", // no dot before the domain
            "x.sandbox-sb-abc123xyz0.example.com", // extra label in front
            "sandbox-sb-abc123xyz0.x.example.com", // extra label between
            "sandbox-sb-abc123xyz.example.com",  // id too short
            "sandbox-sb-abc123xyz01.example.com", // id too long
            "sandbox-xb-abc123xyz0.example.com", // wrong id prefix
            "sandbox-sb-abc_23xyz0.example.com", // bad id char
            "sandbox-.example.com",              // no id
            "dev--sb-abc123xyz0.example.com",    // empty name
            "dev-sb-abc123xyz0.example.com",     // no name at all
            "dev-1web-sb-abc123xyz0.example.com", // name starts with a digit
            "dev-web--sb-abc123xyz0.example.com", // name ends with '-'
            "dev-we_b-sb-abc123xyz0.example.com", // bad name char
            "dev-webxsb-abc123xyz0.example.com", // no hyphen before the id
            "web-sb-abc123xyz0.example.com",     // unknown prefix
            "sandbox-sb-abc123xyz0.example.com:abc", // bad port
            "[::1]:443",                         // IP literal
            "127.0.0.1",
        ] {
            assert_eq!(parse_host(host, "example.com"), None, "{host}");
        }
        let long = "a".repeat(31);
        assert_eq!(
            parse_host(&format!("dev-{long}-sb-abc123xyz0.localhost"), "localhost"),
            None
        );
    }
}
