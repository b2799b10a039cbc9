//! Header and query rewriting shared by requests and responses: hop-by-hop removal and
//! stripping the manager's own credentials before they reach an untrusted upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection (RFC 9110 §7.6.1) and so must not be forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True when the headers ask for an HTTP/1.1 protocol upgrade (`Connection: upgrade`
/// together with an `Upgrade` header).
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including every `Proxy-*` header and the headers named in
/// `Connection`. With `keep_upgrade` the `Upgrade` header survives and `Connection` is
/// reset to `upgrade`, which is all the next hop needs to switch protocols.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a cookie called `cookie` is the cookie `name`, or its `__Host-` or
/// `__Secure-` prefixed form (prefixes compared without case, as browsers do).
fn is_cookie(cookie: &str, name: &str) -> bool {
    let lower = cookie.to_ascii_lowercase();
    let bare = lower
        .strip_prefix("__host-")
        .or_else(|| lower.strip_prefix("__secure-"))
        .map_or(cookie, |rest| &cookie[cookie.len() - rest.len()..]);
    bare == name
}

/// Drops the cookie `name` (and its `__Host-`/`__Secure-` forms) from every `Cookie`
/// header and merges the rest into one header (HTTP/2 clients may split cookies;
/// HTTP/1.1 upstreams expect a single line).
pub(crate) fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            !pair
                .split('=')
                .next()
                .is_some_and(|n| is_cookie(n.trim(), name))
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
}

/// The name of the cookie a `Set-Cookie` value sets, if the value is well formed:
/// visible ASCII, `name=value` first, a name made of RFC 6265 token characters.
fn set_cookie_name(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    if s.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    let (pair, _) = s.split_once(';').unwrap_or((s, ""));
    let (name, _) = pair.split_once('=')?;
    let name = name.trim();
    let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
    (!name.is_empty() && name.bytes().all(token)).then_some(name)
}

/// Drops `Set-Cookie` headers that would set the cookie `name` (in any prefixed
/// form), so an upstream cannot plant or overwrite the manager's session cookie,
/// and every `Set-Cookie` it cannot parse (a browser might read it differently).
pub(crate) fn strip_set_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| set_cookie_name(v).is_some_and(|n| !is_cookie(n, name)))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in kept {
        headers.append(header::SET_COOKIE, value);
    }
}

/// Returns `query` without any `name` or `name=value` pair, keeping the other pairs in
/// order; `None` when nothing is left.
pub(crate) fn strip_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| pair.split('=').next() != Some(name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["accept"], "*/*");
    }

    #[test]
    fn upgrade_pair_kept_when_upgrading() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(wants_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "abc");
        assert!(!h.contains_key("keep-alive"));
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn session_cookie_removed_others_kept() {
        let mut h = map(&[
            ("cookie", "a=1; atelier_session=secret; b=2"),
            ("cookie", "atelier_session=again;c=3"),
        ]);
        strip_cookie(&mut h, "atelier_session");
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2; c=3");

        let mut h = map(&[("cookie", "atelier_session=secret")]);
        strip_cookie(&mut h, "atelier_session");
        assert!(!h.contains_key("cookie"));

        let mut h = map(&[(
            "cookie",
            "__Host-atelier_session=s; __secure-atelier_session=s; k=1",
        )]);
        strip_cookie(&mut h, "atelier_session");
        assert_eq!(h["cookie"], "k=1");

        let mut h = map(&[("cookie", "atelier_session_x=keep; xatelier_session=keep")]);
        strip_cookie(&mut h, "atelier_session");
        assert_eq!(h["cookie"], "atelier_session_x=keep; xatelier_session=keep");
    }

    #[test]
    fn set_cookie_for_session_dropped() {
        let mut h = map(&[
            ("set-cookie", "atelier_session=evil; Domain=example.com"),
            ("set-cookie", "app=1; Path=/"),
        ]);
        strip_set_cookie(&mut h, "atelier_session");
        let left: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(left, ["app=1; Path=/"]);

        let mut h = map(&[
            ("set-cookie", "__Host-atelier_session=evil; Path=/; Secure"),
            ("set-cookie", "__SECURE-atelier_session=evil; Secure"),
            ("set-cookie", " atelier_session =evil"),
            ("set-cookie", "no-equals-sign"),
            ("set-cookie", "=value-without-name"),
            ("set-cookie", "bad name=1"),
            ("set-cookie", "a(b=1"),
            ("set-cookie", "ok=1; Domain=example.com"),
            ("set-cookie", "atelier_session_x=kept"),
        ]);
        h.append(
            "set-cookie",
            HeaderValue::from_bytes(b"x=\xff\xfe").unwrap(),
        );
        h.append("set-cookie", HeaderValue::from_bytes(b"y=1\tz").unwrap());
        strip_set_cookie(&mut h, "atelier_session");
        let left: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(left, ["ok=1; Domain=example.com", "atelier_session_x=kept"]);
    }

    #[test]
    fn query_token_removed() {
        let t = "atelier_token";
        assert_eq!(strip_query_param("atelier_token=s3cret", t), None);
        assert_eq!(
            strip_query_param("a=1&atelier_token=s&b=2", t).as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(
            strip_query_param("atelier_token&a", t).as_deref(),
            Some("a")
        );
        assert_eq!(
            strip_query_param("atelier_tokens=1", t).as_deref(),
            Some("atelier_tokens=1")
        );
        assert_eq!(strip_query_param("", t), None);
    }
}
