//! The OpenAPI document is generated from the handlers; `docs/openapi.json` is its
//! reviewed snapshot. Any API change must update it on purpose:
//! `UPDATE_OPENAPI=1 cargo test -p atelier-server --test openapi`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn openapi_document_matches_the_reviewed_snapshot() {
    let doc = atelier_server::api::openapi();
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == text,
        "docs/openapi.json is out of date with the API; review the change and run \
         UPDATE_OPENAPI=1 cargo test -p atelier-server --test openapi"
    );
    // Every route under /api/v1 is documented and requires the bearer token.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let paths = v["paths"].as_object().unwrap();
    for p in [
        "/api/v1/sandboxes",
        "/api/v1/sandboxes/{id}",
        "/api/v1/sandboxes/{id}/exec",
        "/api/v1/sandboxes/{id}/files",
        "/api/v1/status",
    ] {
        assert!(paths.contains_key(p), "{p} missing from the document");
    }
    assert_eq!(v["security"][0]["bearer"], serde_json::json!([]));
}

fn document() -> serde_json::Value {
    serde_json::to_value(atelier_server::api::openapi()).unwrap()
}

/// Every operation under /api/v1, as (method, path, operation).
fn operations(doc: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1/") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            out.push((method.clone(), path.clone(), op.clone()));
        }
    }
    assert!(out.len() > 30, "only {} operations documented", out.len());
    out
}

fn is_error_body(resp: &serde_json::Value) -> bool {
    resp["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ApiErrorBody"
        && !resp["description"].as_str().unwrap_or("").is_empty()
}

#[test]
fn operation_ids_are_unique() {
    let doc = document();
    let mut seen = std::collections::HashMap::new();
    for (method, path, op) in operations(&doc) {
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} has no operationId"))
            .to_owned();
        if let Some(other) = seen.insert(id.clone(), format!("{method} {path}")) {
            panic!("operationId {id} names both {other} and {method} {path}");
        }
    }
}

#[test]
fn every_route_documents_the_errors_it_can_give() {
    let doc = document();
    for (method, path, op) in operations(&doc) {
        let responses = &op["responses"];
        for status in ["401", "500"] {
            assert!(
                is_error_body(&responses[status]),
                "{method} {path} does not document {status} with an ApiErrorBody"
            );
        }
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let takes_query = params.iter().any(|p| p["in"] == "query");
        let takes_json = !op["requestBody"]["content"]["application/json"].is_null();
        if takes_query || takes_json {
            assert!(
                is_error_body(&responses["400"]),
                "{method} {path} extracts a query or JSON body but does not document 400"
            );
        }
        if path.contains("{id}") && path.starts_with("/api/v1/sandboxes/") {
            assert!(
                is_error_body(&responses["404"]),
                "{method} {path} names a sandbox but does not document 404"
            );
        }
        // A parameter "in: path" must be in the path template (utoipa puts the fields
        // of an IntoParams struct in the path unless told otherwise).
        for p in &params {
            let name = p["name"].as_str().unwrap();
            if p["in"] == "path" {
                assert!(
                    path.contains(&format!("{{{name}}}")),
                    "{method} {path}: parameter {name} is documented in the path but is not in it"
                );
            }
        }
        for (status, resp) in responses.as_object().unwrap() {
            if status.starts_with('4') || status.starts_with('5') {
                assert!(
                    is_error_body(resp),
                    "{method} {path} {status} has no error body"
                );
            }
        }
    }
}

#[test]
fn the_document_states_the_limits_the_server_enforces() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreateBody"]["properties"];
    assert_eq!(create["name"]["pattern"], atelier_core::NAME_PATTERN);
    assert_eq!(create["name"]["minLength"], 1);
    assert_eq!(create["name"]["maxLength"], atelier_core::MAX_NAME_LEN);
    assert_eq!(create["vcpus"]["minimum"], atelier_core::MIN_VCPUS);
    assert_eq!(create["vcpus"]["maximum"], atelier_core::MAX_VCPUS);
    assert_eq!(
        create["memory_mib"]["minimum"],
        atelier_core::MIN_MEMORY_MIB
    );
    assert_eq!(
        create["memory_mib"]["maximum"],
        atelier_core::MAX_MEMORY_MIB
    );
    assert_eq!(
        schemas["ForkBody"]["properties"]["name"]["pattern"],
        atelier_core::NAME_PATTERN
    );
    let dev = &schemas["DevStartBody"]["properties"];
    assert_eq!(
        dev["name"]["pattern"],
        atelier_agent_proto::DEV_NAME_PATTERN
    );
    assert_eq!(
        dev["command"]["maxLength"],
        atelier_core::workspace::MAX_COMMAND_BYTES
    );
    assert_eq!(dev["command"]["minLength"], 1);
    assert_eq!(schemas["ExecBody"]["properties"]["command"]["minItems"], 1);

    for method in ["get", "put"] {
        let op = &doc["paths"]["/api/v1/sandboxes/{id}/files"][method];
        let params = op["parameters"].as_array().unwrap();
        let path = params.iter().find(|p| p["name"] == "path").unwrap();
        assert_eq!(
            path["in"], "query",
            "{method} files: path is a query parameter"
        );
        assert_eq!(path["required"], true, "{method} files: path is required");
        assert!(
            path["schema"]["pattern"]
                .as_str()
                .unwrap()
                .starts_with("^/"),
            "{method} files: path must be absolute"
        );
        let mode = params.iter().find(|p| p["name"] == "mode").unwrap();
        assert_eq!(mode["required"], false);
    }
    let types = &doc["paths"]["/api/v1/events"]["get"]["parameters"][0];
    assert_eq!(types["name"], "types");
    let types = regex::Regex::new(types["schema"]["pattern"].as_str().unwrap()).unwrap();
    for ok in [
        "",
        "sandbox",
        "sandbox,dev.state",
        " prebuild.log , workspace",
    ] {
        assert!(types.is_match(ok), "events types {ok:?}");
    }
    for bad in [",", "bogus", "sandbox,", "sandbox.nope", "dev.state.x"] {
        assert!(!types.is_match(bad), "events types {bad:?}");
    }
    let secret = &doc["paths"]["/api/v1/secrets/{name}"]["put"]["parameters"][0];
    assert_eq!(
        secret["schema"]["pattern"],
        atelier_core::workspace::SECRET_NAME_PATTERN
    );
}

/// Every string of `alphabet` up to `max_len` long, plus long ones around `edge`.
fn samples(alphabet: &str, max_len: usize, edge: usize) -> Vec<String> {
    let chars: Vec<char> = alphabet.chars().collect();
    let mut out = vec![String::new()];
    let mut level = vec![String::new()];
    for _ in 0..max_len {
        level = level
            .iter()
            .flat_map(|s| chars.iter().map(move |c| format!("{s}{c}")))
            .collect();
        out.extend(level.iter().cloned());
    }
    for n in edge.saturating_sub(1)..=edge + 1 {
        for (first, last) in [('a', 'a'), ('a', '-'), ('0', 'a'), ('a', '.')] {
            let mut s = String::from(first);
            s.push_str(&"b".repeat(n.saturating_sub(2)));
            s.push(last);
            out.push(s);
        }
    }
    out
}

#[test]
fn name_patterns_agree_with_the_validators() {
    let name = regex::Regex::new(atelier_core::NAME_PATTERN).unwrap();
    for s in samples("a0-_.A ", 4, atelier_core::MAX_NAME_LEN) {
        // The only rule the pattern leaves out: a name must not look like an id.
        let ok = atelier_core::validate_name(&s).is_ok();
        assert_eq!(name.is_match(&s), ok, "sandbox name {s:?}");
    }
    assert!(
        name.is_match("sb-0123456789") && atelier_core::validate_name("sb-0123456789").is_err()
    );

    let secret = regex::Regex::new(atelier_core::workspace::SECRET_NAME_PATTERN).unwrap();
    for s in samples("a0-_.A =", 4, atelier_core::workspace::MAX_SECRET_NAME_LEN) {
        let ok = atelier_core::validate_secret_name(&s).is_ok();
        assert_eq!(secret.is_match(&s), ok, "secret name {s:?}");
    }

    let dev = regex::Regex::new(atelier_agent_proto::DEV_NAME_PATTERN).unwrap();
    for s in samples("a0-_.A", 4, atelier_agent_proto::DEV_NAME_MAX) {
        let ok = atelier_agent_proto::valid_dev_name(&s);
        assert_eq!(dev.is_match(&s), ok, "dev command name {s:?}");
    }
}

/// Every `pattern` in the document, with where it is.
fn patterns(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "pattern"
                    && let Some(p) = x.as_str()
                {
                    out.push((at.to_owned(), p.to_owned()));
                }
                patterns(x, &format!("{at}/{k}"), out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                patterns(x, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_pattern_is_a_valid_regular_expression() {
    let mut found = Vec::new();
    patterns(&document(), "", &mut found);
    assert!(found.len() >= 10, "only {} patterns", found.len());
    for (at, p) in found {
        assert!(
            regex::Regex::new(&p).is_ok(),
            "{at}: {p:?} does not compile"
        );
    }
}

#[test]
fn every_domain_the_schema_allows_is_accepted() {
    let doc = document();
    let pattern = doc["components"]["schemas"]["DomainPattern"]["pattern"]
        .as_str()
        .unwrap();
    let re = regex::Regex::new(pattern).unwrap();
    let mut matched = 0;
    for s in samples("a0-.*", 6, 63)
        .into_iter()
        .chain(["github.com", "*.pypi.org", "GitHub.COM", "*.a.b", "x1.io"].map(String::from))
    {
        if re.is_match(&s) {
            matched += 1;
            assert!(
                s.parse::<atelier_core::DomainPattern>().is_ok(),
                "the schema allows {s:?} but the server refuses it"
            );
        }
    }
    assert!(matched > 100, "only {matched} samples matched");
    for bad in ["1.2.3.4", "*.com", "a..b", "-a.com", "a.com-", ""] {
        assert!(!re.is_match(bad), "{bad:?}");
    }
}

/// Whether the server accepts a workspace definition with `field` set to `value`.
fn workspace_accepts(edit: impl FnOnce(&mut serde_json::Value)) -> bool {
    let mut spec = serde_json::json!({
        "name": "w",
        "dev": [{"name": "d", "command": "x"}],
        "secrets": {"files": [{"path": "/f", "secret": "s"}]},
    });
    edit(&mut spec);
    serde_json::from_value::<atelier_core::WorkspaceSpec>(spec).is_ok_and(|s| s.validate().is_ok())
}

#[test]
fn workspace_path_and_mode_patterns_agree_with_the_validator() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let re = |v: &serde_json::Value| regex::Regex::new(v.as_str().unwrap()).unwrap();
    let cwd = re(&schemas["WorkspaceDev"]["properties"]["cwd"]["pattern"]);
    let file = re(&schemas["SecretFile"]["properties"]["path"]["pattern"]);
    let mode = re(&schemas["SecretFile"]["properties"]["mode"]["pattern"]);
    for s in samples("/a.\u{1}", 5, 8) {
        let ok = workspace_accepts(|w| w["dev"][0]["cwd"] = s.clone().into());
        assert_eq!(cwd.is_match(&s), ok, "dev cwd {s:?}");
        let ok = workspace_accepts(|w| w["secrets"]["files"][0]["path"] = s.clone().into());
        // The pattern refuses a few paths the server takes ("//"): never the reverse.
        assert!(!file.is_match(&s) || ok, "secret file path {s:?}");
    }
    for s in samples("0178", 4, 2) {
        let ok = workspace_accepts(|w| w["secrets"]["files"][0]["mode"] = s.clone().into());
        assert_eq!(mode.is_match(&s), ok, "secret file mode {s:?}");
    }
}

#[test]
fn mount_path_pattern_agrees_with_the_validator() {
    let doc = document();
    let props = &doc["components"]["schemas"]["MountSpec"]["properties"];
    let re = regex::Regex::new(props["target"]["pattern"].as_str().unwrap()).unwrap();
    for s in samples("/a.\0", 5, 8) {
        let spec = atelier_core::SandboxSpec {
            name: "m".into(),
            image: "minimal".into(),
            vcpus: 1,
            memory_mib: 1024,
            mounts: vec![atelier_core::MountSpec {
                source: "/srv".into(),
                target: s.clone(),
                read_only: false,
            }],
            mount_owner: None,
            cold_boot: false,
            egress: Default::default(),
            workspace: None,
        };
        // The pattern refuses a few paths the validator takes ("//"): never the reverse.
        assert!(
            !re.is_match(&s) || spec.validate().is_ok(),
            "mount target {s:?}"
        );
    }
}

#[test]
fn stdin_pattern_accepts_exactly_what_the_server_decodes() {
    use base64::Engine;
    let doc = document();
    let stdin = &doc["components"]["schemas"]["ExecBody"]["properties"]["stdin"];
    let re = regex::Regex::new(stdin["pattern"].as_str().unwrap()).unwrap();
    let mut decoded = 0;
    for s in samples("AQB/=", 4, 4)
        .into_iter()
        .chain(["aGk=", "aGVsbG8=", "aGVsbG8gd29ybGQ=", "aGj=", "aR=="].map(String::from))
    {
        let ok = base64::engine::general_purpose::STANDARD.decode(&s).is_ok();
        decoded += usize::from(ok);
        assert_eq!(re.is_match(&s), ok, "stdin {s:?}");
    }
    assert!(decoded > 20, "only {decoded} samples decoded");
}
