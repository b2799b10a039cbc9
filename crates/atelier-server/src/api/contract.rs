//! What the OpenAPI document promises beyond the handlers' own attributes: the
//! error statuses every route shares (so no route can forget one), and the limits
//! the server enforces, written from the very constants that enforce them (utoipa's
//! `#[schema(...)]` takes only literals, so a literal would drift).

use atelier_agent_proto::{DEV_NAME_MAX, DEV_NAME_PATTERN};
use atelier_core::workspace::{
    MAX_COMMAND_BYTES, MAX_DEV, MAX_DISK_GIB, MAX_ENV, MAX_INIT, MAX_PATH_LEN, MAX_REPOS,
    MAX_SECRET_FILES, MAX_SECRET_NAME_LEN, MAX_URL_LEN, MIN_DISK_GIB, SECRET_NAME_PATTERN,
};
use atelier_core::{
    MAX_EGRESS_DOMAINS, MAX_MEMORY_MIB, MAX_MOUNTS, MAX_NAME_LEN, MAX_VCPUS, MIN_MEMORY_MIB,
    MIN_VCPUS, NAME_PATTERN,
};
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::schema::{Array, Object, Schema};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

use super::events::EVENT_TYPES;
use super::sandboxes::{MAX_GUEST_PATH, MAX_STDIN};
use crate::dev::MAX_DEV_ENV;
use crate::workspaces::MAX_SECRET_BYTES;

/// Text without a NUL byte.
const NO_NUL: &str = "^[^\\u0000]*$";
/// A shell command line: at least one non-blank character, no NUL byte.
const COMMAND_PATTERN: &str = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$";
/// An absolute guest path without NUL bytes.
const ABS_PATH_PATTERN: &str = "^/[^\\u0000]*$";
/// An egress allow-list entry. Stricter than `DomainPattern`'s parser (the last
/// label must start with a letter, no trailing dot) so that it can be a plain
/// regular expression: every entry it matches is accepted.
const DOMAIN_PATTERN: &str = "^(?:\\*\\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)+|(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\\.)*)[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$";
/// Longest egress allow-list entry.
const MAX_DOMAIN_LEN: usize = 253;
/// A workspace secret file's mode: octal, at most 0o777.
const SECRET_MODE_PATTERN: &str = "^(?:[0-7]{1,3}|0[0-7]{3})$";
/// An environment variable name in a workspace definition.
const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]{0,255}$";

/// Characters a workspace definition's paths may not hold: control characters.
const CONTROL: &str = "\\u0000-\\u001f\\u007f-\\u009f";

/// An absolute path without a `..` component or a character of the class `bad`;
/// `/` itself only when `root_ok`.
fn path_pattern(root_ok: bool, bad: &str) -> String {
    // One character of a component, and one that is not a dot.
    let x = format!("[^/{bad}]");
    let xn = format!("[^/.{bad}]");
    // Any component but `..`: three or more characters, two that are not both
    // dots, or one.
    let nonempty = format!("(?:{x}{{3,}}|{xn}{x}|\\.{xn}|{x})");
    let any = format!("{nonempty}?");
    if root_ok {
        format!("^(?:/{any})+$")
    } else {
        format!("^/{nonempty}(?:/{any})*$")
    }
}

/// `?types=` of the events stream: empty, or a comma-separated list of event types
/// and type prefixes (the part before the dot), each maybe padded with blanks.
fn event_types_pattern() -> String {
    let mut names: Vec<String> = EVENT_TYPES.iter().map(|t| t.replace('.', "\\.")).collect();
    let mut prefixes: Vec<&str> = EVENT_TYPES
        .iter()
        .filter_map(|t| t.split('.').next())
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    names.extend(prefixes.into_iter().map(str::to_owned));
    let one = format!("[ \\t]*(?:{})[ \\t]*", names.join("|"));
    format!("^(?:{one}(?:,{one})*)?$")
}

/// Standard padded base64 as the server decodes it (unused trailing bits zero).
const BASE64_PATTERN: &str =
    "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";
/// An octal file mode of at most 0o7777.
pub(super) const MODE_PATTERN: &str = "^[0-7]{1,4}$";

/// The operations of a path item.
fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// What an error status means on every route that documents it.
pub(super) fn error_description(status: &str) -> Option<&'static str> {
    Some(match status {
        "400" => {
            "`invalid`: the body or query does not parse, or a value breaks a rule; \
             the message names the field and the rule"
        }
        "401" => "`unauthorized`: the bearer token is missing or invalid",
        "404" => {
            "`not_found`: the sandbox, dev command, workspace, secret, prebuild, image \
             or guest file named does not exist"
        }
        "409" => {
            "`conflict`: the target's state does not allow this now (e.g. the sandbox \
             is not running, or another operation holds it), or the name is taken"
        }
        "500" => {
            "`internal`: a fault in the manager; the message carries the request id \
             to look for in the manager log"
        }
        "503" => {
            "`unavailable`: the guest agent or QEMU did not answer in time or is not \
             connected yet; retry shortly"
        }
        "507" => "`resource_exhausted`: the storage pool (or an address pool) is full",
        _ => return None,
    })
}

/// Makes every operation id under `/api/v1` unique (`{tag}_{handler}`) and adds to
/// every operation there the error responses every handler there can give: 401 (the token middleware runs first), 500 (the store can fail), and
/// 400 when it extracts a query or a JSON body (`ApiQuery`/`ApiJson` reject with
/// 400). Gives every error response without its own text the shared description.
pub(super) struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, doc: &mut OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/api/v1/") {
                continue;
            }
            for op in operations_mut(item) {
                // Handlers are named per module (`list`, `show`, `logs`); the
                // document needs ids unique across the API (generated clients name
                // their functions after them): `{tag}_{handler}`.
                if let (Some(tag), Some(id)) =
                    (op.tags.as_ref().and_then(|t| t.first()), &op.operation_id)
                    && id != tag
                    && !id.starts_with(&format!("{tag}_"))
                {
                    op.operation_id = Some(format!("{tag}_{id}"));
                }
                let has_query = op
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| p.parameter_in == ParameterIn::Query);
                let has_json = op
                    .request_body
                    .as_ref()
                    .is_some_and(|b| b.content.contains_key("application/json"));
                let mut add = vec!["401", "500"];
                if has_query || has_json {
                    add.push("400");
                }
                for status in add {
                    op.responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error_response(""));
                }
                for (status, resp) in op.responses.responses.iter_mut() {
                    if let RefOr::T(r) = resp
                        && r.description.is_empty()
                        && let Some(text) = error_description(status)
                    {
                        r.description = text.to_owned();
                    }
                }
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ApiErrorBody")))
                    .build(),
            )
            .build(),
    )
}

/// Writes the limits the server enforces into the schemas and parameters.
pub(super) struct Constraints;

impl utoipa::Modify for Constraints {
    fn modify(&self, doc: &mut OpenApi) {
        let name = |o: &mut Object| {
            o.pattern = Some(NAME_PATTERN.to_owned());
            o.min_length = Some(1);
            o.max_length = Some(MAX_NAME_LEN);
        };
        let vcpus = |o: &mut Object| range(o, MIN_VCPUS, MAX_VCPUS);
        let memory = |o: &mut Object| range(o, MIN_MEMORY_MIB, MAX_MEMORY_MIB);
        let command = |o: &mut Object| {
            o.pattern = Some(COMMAND_PATTERN.to_owned());
            o.min_length = Some(1);
            o.max_length = Some(MAX_COMMAND_BYTES);
        };
        let abs_path = |o: &mut Object| {
            o.pattern = Some(ABS_PATH_PATTERN.to_owned());
            o.max_length = Some(MAX_GUEST_PATH);
        };
        let port = |o: &mut Object| range(o, 1, u16::MAX.into());

        // POST /sandboxes and /sandboxes/{id}/fork.
        object(doc, "CreateBody", &["name"], name);
        object(doc, "CreateBody", &["workspace"], name);
        object(doc, "CreateBody", &["vcpus"], vcpus);
        object(doc, "CreateBody", &["memory_mib"], memory);
        array(doc, "CreateBody", &["mounts"], |a| {
            a.max_items = Some(MAX_MOUNTS)
        });
        // Absolute, not `/`, no `..` component, no NUL.
        let mount = path_pattern(false, "\\u0000");
        for field in ["source", "target"] {
            object(doc, "MountSpec", &[field], |o| {
                o.pattern = Some(mount.clone());
                o.max_length = Some(MAX_PATH_LEN);
            });
        }
        object(doc, "ForkBody", &["name"], name);
        object(doc, "TokenCreateBody", &["name"], name);
        egress_allow(doc);
        object(doc, "DomainPattern", &[], |o| {
            o.pattern = Some(DOMAIN_PATTERN.to_owned());
            o.max_length = Some(MAX_DOMAIN_LEN);
        });

        // POST /sandboxes/{id}/exec.
        array(doc, "ExecBody", &["command"], |a| {
            a.min_items = Some(1);
            // The program must be named; arguments may be empty.
            a.prefix_items = vec![Schema::Object(
                string_object()
                    .min_length(Some(1))
                    .pattern(Some(NO_NUL))
                    .build(),
            )];
            // The agent cannot pass a NUL byte to execve.
            a.items = utoipa::openapi::schema::ArrayItems::RefOrSchema(Box::new(RefOr::T(
                Schema::Object(string_object().pattern(Some(NO_NUL)).build()),
            )));
        });
        object(doc, "ExecBody", &["env"], |o| {
            o.property_names = Some(Box::new(Schema::Object(
                string_object().pattern(Some(NO_NUL)).build(),
            )));
            o.additional_properties = Some(Box::new(
                utoipa::openapi::schema::AdditionalProperties::RefOr(RefOr::T(Schema::Object(
                    string_object().pattern(Some(NO_NUL)).build(),
                ))),
            ));
        });
        object(doc, "ExecBody", &["stdin"], |o| {
            o.pattern = Some(BASE64_PATTERN.to_owned());
            o.max_length = Some(MAX_STDIN.div_ceil(3) * 4);
            o.content_encoding = "base64".to_owned();
        });

        // POST /sandboxes/{id}/dev.
        object(doc, "DevStartBody", &["name"], dev_name);
        object(doc, "DevStartBody", &["command"], command);
        object(doc, "DevStartBody", &["port"], port);
        object(doc, "DevStartBody", &["cwd"], |o| {
            o.pattern = Some(ABS_PATH_PATTERN.to_owned())
        });
        object(doc, "DevStartBody", &["env"], |o| {
            o.max_properties = Some(MAX_DEV_ENV);
            o.property_names = Some(Box::new(Schema::Object(
                string_object().pattern(Some("^[^=\\u0000]+$")).build(),
            )));
            o.additional_properties = Some(Box::new(
                utoipa::openapi::schema::AdditionalProperties::RefOr(RefOr::T(Schema::Object(
                    string_object().pattern(Some(NO_NUL)).build(),
                ))),
            ));
        });
        object(doc, "DevStartBody", &["restart"], |o| {
            o.enum_values = Some(vec![
                "always".into(),
                "on-failure".into(),
                "never".into(),
                serde_json::Value::Null,
            ]);
        });

        // PUT /workspaces/{name}: the definition's own limits.
        object(doc, "WorkspaceSpec", &["name"], name);
        object(doc, "Resources", &["vcpus"], vcpus);
        object(doc, "Resources", &["memory_mib"], memory);
        object(doc, "Resources", &["disk_gib"], |o| {
            range(o, MIN_DISK_GIB, MAX_DISK_GIB)
        });
        array(doc, "WorkspaceSpec", &["repos"], |a| {
            a.max_items = Some(MAX_REPOS)
        });
        object(doc, "RepoSpec", &["url"], |o| {
            o.max_length = Some(MAX_URL_LEN)
        });
        array(doc, "WorkspaceSpec", &["init"], |a| {
            a.max_items = Some(MAX_INIT);
            if let utoipa::openapi::schema::ArrayItems::RefOrSchema(items) = &mut a.items
                && let RefOr::T(Schema::Object(o)) = items.as_mut()
            {
                command(o);
            }
        });
        array(doc, "WorkspaceSpec", &["dev"], |a| {
            a.max_items = Some(MAX_DEV)
        });
        object(doc, "WorkspaceDev", &["name"], dev_name);
        object(doc, "WorkspaceDev", &["command"], command);
        object(doc, "WorkspaceDev", &["port"], port);
        object(doc, "WorkspaceDev", &["env"], |o| {
            o.max_properties = Some(MAX_ENV)
        });
        object(doc, "WorkspaceSecrets", &["env"], |o| {
            o.max_properties = Some(MAX_ENV)
        });
        array(doc, "WorkspaceSecrets", &["files"], |a| {
            a.max_items = Some(MAX_SECRET_FILES)
        });
        object(doc, "WorkspaceSpec", &["image"], name);
        let dir = path_pattern(true, CONTROL);
        let file = path_pattern(false, CONTROL);
        object(doc, "WorkspaceDev", &["cwd"], |o| {
            o.pattern = Some(dir);
            o.max_length = Some(MAX_PATH_LEN);
        });
        for schema in ["RepoSpec", "SecretFile"] {
            object(doc, schema, &["path"], |o| {
                o.pattern = Some(file.clone());
                o.max_length = Some(MAX_PATH_LEN);
            });
        }
        object(doc, "SecretFile", &["mode"], |o| {
            o.pattern = Some(SECRET_MODE_PATTERN.to_owned());
        });
        object(doc, "RepoSpec", &["credentials"], secret_name);
        for (schema, field) in [("WorkspaceDev", "env"), ("WorkspaceSecrets", "env")] {
            object(doc, schema, &[field], |o| {
                o.property_names = Some(Box::new(Schema::Object(
                    string_object().pattern(Some(ENV_NAME_PATTERN)).build(),
                )));
            });
        }
        object(doc, "WorkspaceDev", &["env"], |o| {
            o.additional_properties = Some(Box::new(
                utoipa::openapi::schema::AdditionalProperties::RefOr(RefOr::T(Schema::Object(
                    string_object()
                        .pattern(Some(NO_NUL))
                        .max_length(Some(MAX_COMMAND_BYTES))
                        .build(),
                ))),
            ));
        });
        object(doc, "SecretRef", &["secret"], secret_name);
        object(doc, "SecretFile", &["secret"], secret_name);

        // Path and query parameters.
        let params: [(&str, &str, Edit); 7] = [
            ("/api/v1/sandboxes/{id}/files", "path", abs_path),
            ("/api/v1/sandboxes/{id}/files", "mode", |o| {
                o.pattern = Some(MODE_PATTERN.to_owned());
            }),
            ("/api/v1/sandboxes/{id}/dev/{name}", "name", dev_name),
            ("/api/v1/sandboxes/{id}/dev/{name}/logs", "name", dev_name),
            ("/api/v1/secrets/{name}", "name", secret_name),
            ("/api/v1/workspaces/{name}", "name", name),
            ("/api/v1/workspaces/{name}/prebuilds", "name", name),
        ];
        for (path, param, f) in params {
            parameter(doc, path, param, f);
        }
        let types = event_types_pattern();
        if let Some(p) = doc
            .paths
            .paths
            .get_mut("/api/v1/events")
            .and_then(|i| i.get.as_mut())
            .and_then(|op| op.parameters.as_mut())
            .and_then(|ps| ps.iter_mut().find(|p| p.name == "types"))
            && let Some(RefOr::T(Schema::Object(o))) = &mut p.schema
        {
            o.pattern = Some(types);
        } else {
            debug_assert!(false, "no types parameter on /api/v1/events");
        }
        if let Some(body) = doc
            .paths
            .paths
            .get_mut("/api/v1/secrets/{name}")
            .and_then(|i| i.put.as_mut())
            .and_then(|op| op.request_body.as_mut())
        {
            body.description = Some(format!(
                "The value: 1 byte to {} KiB",
                MAX_SECRET_BYTES / 1024
            ));
        }
    }
}

/// A change to a parameter's schema.
type Edit = fn(&mut Object);

fn dev_name(o: &mut Object) {
    o.pattern = Some(DEV_NAME_PATTERN.to_owned());
    o.min_length = Some(1);
    o.max_length = Some(DEV_NAME_MAX);
}

fn secret_name(o: &mut Object) {
    o.pattern = Some(SECRET_NAME_PATTERN.to_owned());
    o.min_length = Some(1);
    o.max_length = Some(MAX_SECRET_NAME_LEN);
}

fn range(o: &mut Object, min: u32, max: u32) {
    o.minimum = Some((min as usize).into());
    o.maximum = Some((max as usize).into());
}

fn string_object() -> utoipa::openapi::schema::ObjectBuilder {
    utoipa::openapi::schema::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String)
}

/// `{"allow": [...]}` takes 1 to MAX_EGRESS_DOMAINS patterns.
fn egress_allow(doc: &mut OpenApi) {
    let found = schema(doc, "EgressPolicy", &[]).is_some_and(|s| {
        let Schema::OneOf(one) = s else { return false };
        one.items.iter_mut().any(|v| match v {
            RefOr::T(Schema::Object(o)) => match o.properties.get_mut("allow") {
                Some(RefOr::T(Schema::Array(a))) => {
                    a.min_items = Some(1);
                    a.max_items = Some(MAX_EGRESS_DOMAINS);
                    true
                }
                _ => false,
            },
            _ => false,
        })
    });
    debug_assert!(found, "EgressPolicy has no allow list to constrain");
}

/// The schema at `path` (property names) inside the component `name`.
fn schema<'a>(doc: &'a mut OpenApi, name: &str, path: &[&str]) -> Option<&'a mut Schema> {
    let mut cur = match doc.components.as_mut()?.schemas.get_mut(name)? {
        RefOr::T(s) => s,
        RefOr::Ref(_) => return None,
    };
    for key in path {
        let Schema::Object(o) = cur else { return None };
        cur = match o.properties.get_mut(*key)? {
            RefOr::T(s) => s,
            RefOr::Ref(_) => return None,
        };
    }
    Some(cur)
}

/// Applies `f` to the object schema at `path` in component `name`. A missing one is
/// a renamed field: debug builds (and so the tests) fail on it.
fn object(doc: &mut OpenApi, name: &str, path: &[&str], f: impl FnOnce(&mut Object)) {
    match schema(doc, name, path) {
        Some(Schema::Object(o)) => f(o),
        _ => debug_assert!(false, "no object schema {name}.{}", path.join(".")),
    }
}

/// Like [`object`], for an array schema.
fn array(doc: &mut OpenApi, name: &str, path: &[&str], f: impl FnOnce(&mut Array)) {
    match schema(doc, name, path) {
        Some(Schema::Array(a)) => f(a),
        _ => debug_assert!(false, "no array schema {name}.{}", path.join(".")),
    }
}

/// Applies `f` to the schema of parameter `param` on every operation of `path`.
fn parameter(doc: &mut OpenApi, path: &str, param: &str, f: fn(&mut Object)) {
    let mut found = false;
    if let Some(item) = doc.paths.paths.get_mut(path) {
        for op in operations_mut(item) {
            for p in op.parameters.iter_mut().flatten() {
                if p.name == param
                    && let Some(RefOr::T(Schema::Object(o))) = &mut p.schema
                {
                    f(o);
                    found = true;
                }
            }
        }
    }
    debug_assert!(found, "no parameter {param} on {path}");
}
