//! Workspace definitions: a named, versioned recipe for a sandbox (image, resources,
//! repositories to clone, init commands, dev commands, secrets to inject, opencode
//! settings, egress policy), written in YAML or JSON.
//!
//! A definition only *references* secrets by name; their values live encrypted in
//! the manager and never appear in a definition, its hash or its API view.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, MIN_VCPUS, ValidationError, validate_name};

/// Smallest disk, in GiB.
pub const MIN_DISK_GIB: u32 = 1;
/// Largest disk, in GiB.
pub const MAX_DISK_GIB: u32 = 512;
/// Most repositories one workspace clones.
pub const MAX_REPOS: usize = 32;
/// Most init commands.
pub const MAX_INIT: usize = 64;
/// Longest init, dev or shell command, in bytes (16 KiB).
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Most dev commands.
pub const MAX_DEV: usize = 32;
/// Most environment variables in one map (dev env, secret env).
pub const MAX_ENV: usize = 128;
/// Most secret files.
pub const MAX_SECRET_FILES: usize = 64;
/// Longest repository URL.
pub const MAX_URL_LEN: usize = 2048;
/// Longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 64;
/// The rule of [`validate_secret_name`] as a regular expression (ECMA 262 and Rust
/// `regex` syntax), for API schemas.
pub const SECRET_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9._-]{0,63}$";
/// Longest guest path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Most OpenCode provider keys per workspace.
pub const MAX_OPENCODE_KEYS: usize = 32;
/// The dev-command name of the OpenCode server prebuilds start; workspace dev
/// commands cannot use it.
pub const OPENCODE_DEV_NAME: &str = "opencode";

/// A workspace definition, as written by the user (YAML or JSON) and stored by the
/// manager. Unknown keys are refused so that typos are caught.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Unique name; the same rules as sandbox names (a DNS label).
    pub name: String,
    /// Image its sandboxes boot (default `dev-base`).
    #[serde(default = "default_image")]
    pub image: String,
    /// vCPUs, memory and disk of its sandboxes.
    #[serde(default)]
    pub resources: Resources,
    /// Git repositories cloned into the guest.
    #[serde(default)]
    pub repos: Vec<RepoSpec>,
    /// Shell commands run once, in order, after the repositories are cloned.
    #[serde(default)]
    pub init: Vec<String>,
    /// Dev commands started in every sandbox of this workspace.
    #[serde(default)]
    pub dev: Vec<WorkspaceDev>,
    /// Secrets injected as environment variables and files (by reference).
    #[serde(default)]
    pub secrets: WorkspaceSecrets,
    /// opencode configuration (a JSON object; `null` means `{}`).
    #[serde(
        default = "empty_object",
        deserialize_with = "object_or_null",
        skip_serializing_if = "is_empty_object"
    )]
    #[schema(value_type = Object)]
    pub opencode: serde_json::Value,
    /// Whether prebuilds start OpenCode's server and freeze it running in the
    /// snapshot (`None`: yes when the image has `/usr/local/bin/opencode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode_server: Option<bool>,
    /// Provider keys handed to OpenCode after each restore: provider id (as in
    /// `opencode.provider`, e.g. `anthropic`, `local`) -> secret name. Never in a
    /// prebuild.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub opencode_keys: BTreeMap<String, String>,
    /// What its sandboxes may reach on the network: `allow-all`, `deny-all` or
    /// `{allow: [domains]}`.
    #[serde(default, deserialize_with = "egress_any_format")]
    pub egress: crate::EgressPolicy,
    /// Spending limit over all the workspace's tasks together (cost in USD and/or
    /// tokens); reaching it stops a task's turn and asks a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::task::Budget>,
    /// Task templates for this workspace's tasks, by name: each replaces the
    /// global (or built-in) template of its name, or adds one. The inner `name`
    /// may be left out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<String, crate::task::TaskTemplate>,
}

/// Most task templates one workspace defines.
pub const MAX_WORKSPACE_TEMPLATES: usize = 32;

/// Machine shape of a workspace's sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs, 1 to 8 (default 2).
    pub vcpus: u32,
    /// Guest memory in MiB, 512 to 16384 (default 2048).
    pub memory_mib: u32,
    /// Disk size in GiB, 1 to 512 (default 10).
    pub disk_gib: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 10,
        }
    }
}

/// A git repository cloned into the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepoSpec {
    /// Git URL: `http(s)://`, `git://`, `ssh://` or scp-like `user@host:path`.
    pub url: String,
    /// Branch to check out (default `main`).
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Absolute guest path to clone into; unique among the repositories.
    pub path: String,
    /// Name of the secret holding credentials for the clone, if any.
    #[serde(default)]
    pub credentials: Option<String>,
    /// Where `task done` pushes task branches from the host (default: `url`), e.g.
    /// a fork, or an address the host reaches when the guests use another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_url: Option<String>,
}

/// A dev command a workspace starts in its sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceDev {
    /// Name: 1-30 of a-z, 0-9 and '-', starting with a letter; unique.
    pub name: String,
    /// Shell command line (`/bin/sh -c`).
    pub command: String,
    /// TCP port it serves on.
    #[serde(default)]
    pub port: Option<u16>,
    /// Working directory in the guest (absolute).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment (plain values; use `secrets.env` for secret ones).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The secrets a workspace injects, by reference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSecrets {
    /// Environment variables whose values are secrets, by variable name.
    #[serde(default)]
    pub env: BTreeMap<String, SecretRef>,
    /// Files written into the guest from secrets.
    #[serde(default)]
    pub files: Vec<SecretFile>,
}

/// A reference to a stored secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// The secret's name (see `atelier secret set`).
    pub secret: String,
}

/// A file written into the guest with a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretFile {
    /// Absolute guest path.
    pub path: String,
    /// The secret's name.
    pub secret: String,
    /// Permission bits as an octal string (default `0600`), at most `0777`.
    #[serde(default = "default_mode")]
    pub mode: String,
}

impl SecretFile {
    /// The permission bits; `None` when `mode` is not a valid octal mode (a
    /// validated spec always has one).
    pub fn mode_bits(&self) -> Option<u32> {
        parse_mode(&self.mode)
    }
}

fn default_image() -> String {
    "dev-base".to_owned()
}

fn default_branch() -> String {
    "main".to_owned()
}

fn default_mode() -> String {
    "0600".to_owned()
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn is_empty_object(v: &serde_json::Value) -> bool {
    v.as_object().is_some_and(|m| m.is_empty())
}

fn object_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(if v.is_null() { empty_object() } else { v })
}

/// The egress policy through its JSON form, so YAML documents can write the
/// allow-list as a plain mapping (`{allow: [...]}`) rather than a YAML tag.
fn egress_any_format<'de, D: Deserializer<'de>>(d: D) -> Result<crate::EgressPolicy, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    serde_json::from_value(v).map_err(serde::de::Error::custom)
}

type Res = Result<(), ValidationError>;

fn err(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Res {
    Err(ValidationError::new(field, reason))
}

impl WorkspaceSpec {
    /// Parses a definition from YAML or JSON (YAML is a superset of JSON) and
    /// validates it. Parse errors give the line and column.
    pub fn from_yaml(text: &str) -> Result<WorkspaceSpec, ValidationError> {
        let spec: WorkspaceSpec = serde_norway::from_str(text)
            .map_err(|e| ValidationError::new("workspace document", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field, returning the first that is wrong; the error names the
    /// field's path, e.g. `repos[1].path`.
    pub fn validate(&self) -> Res {
        validate_name(&self.name)?;
        validate_name(&self.image).map_err(|e| ValidationError::new("image", e.reason))?;
        self.validate_resources()?;
        self.validate_repos()?;
        if self.init.len() > MAX_INIT {
            return err("init", format!("at most {MAX_INIT} commands"));
        }
        for (i, cmd) in self.init.iter().enumerate() {
            check_command(format!("init[{i}]"), cmd)?;
        }
        self.validate_dev()?;
        self.validate_secrets()?;
        if !self.opencode.is_object() {
            return err(
                "opencode",
                "must be a mapping (JSON object) of opencode settings",
            );
        }
        self.validate_opencode_keys()?;
        if let Some(b) = &self.budget {
            if b.is_empty() {
                return err(
                    "budget",
                    "give `usd` and/or `tokens`, or leave `budget` out",
                );
            }
            b.validate().map_err(|e| {
                let field = match e.field.as_ref() {
                    "budget_usd" => "budget.usd",
                    _ => "budget.tokens",
                };
                ValidationError::new(field, e.reason)
            })?;
        }
        self.validate_templates()?;
        self.egress.validate()
    }

    fn validate_templates(&self) -> Res {
        if self.templates.len() > MAX_WORKSPACE_TEMPLATES {
            return err(
                "templates",
                format!("at most {MAX_WORKSPACE_TEMPLATES} templates"),
            );
        }
        for (key, t) in &self.templates {
            validate_name(key).map_err(|e| {
                ValidationError::new(
                    format!("templates.{key}"),
                    format!("bad template name: {}", e.reason),
                )
            })?;
            if !t.name.is_empty() && t.name != *key {
                return err(
                    format!("templates.{key}.name"),
                    format!(
                        "{:?} differs from its key {key:?}; leave `name` out or make them equal",
                        t.name
                    ),
                );
            }
            self.template(key)
                .unwrap_or_else(|| t.clone())
                .validate()
                .map_err(|e| {
                    ValidationError::new(format!("templates.{key}.{}", e.field), e.reason)
                })?;
        }
        Ok(())
    }

    /// The workspace's own template `name`, with its name filled in, if it has one.
    pub fn template(&self, name: &str) -> Option<crate::task::TaskTemplate> {
        self.templates.get(name).map(|t| crate::task::TaskTemplate {
            name: name.to_owned(),
            ..t.clone()
        })
    }

    fn validate_resources(&self) -> Res {
        let r = &self.resources;
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&r.vcpus) {
            return err(
                "resources.vcpus",
                format!(
                    "{} is out of range; use {MIN_VCPUS} to {MAX_VCPUS}",
                    r.vcpus
                ),
            );
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&r.memory_mib) {
            return err(
                "resources.memory_mib",
                format!(
                    "{} MiB is out of range; use {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB",
                    r.memory_mib
                ),
            );
        }
        if !(MIN_DISK_GIB..=MAX_DISK_GIB).contains(&r.disk_gib) {
            return err(
                "resources.disk_gib",
                format!(
                    "{} GiB is out of range; use {MIN_DISK_GIB} to {MAX_DISK_GIB} GiB",
                    r.disk_gib
                ),
            );
        }
        Ok(())
    }

    fn validate_repos(&self) -> Res {
        if self.repos.len() > MAX_REPOS {
            return err("repos", format!("at most {MAX_REPOS} repositories"));
        }
        for (i, r) in self.repos.iter().enumerate() {
            check_git_url(format!("repos[{i}].url"), &r.url)?;
            check_ref_name(format!("repos[{i}].branch"), &r.branch)?;
            check_abs(format!("repos[{i}].path"), &r.path)?;
            if let Some(j) = self.repos[..i].iter().position(|o| o.path == r.path) {
                return err(
                    format!("repos[{i}].path"),
                    format!("{} is already the path of repos[{j}]", r.path),
                );
            }
            if let Some(c) = &r.credentials {
                check_secret_name(format!("repos[{i}].credentials"), c)?;
            }
            if let Some(u) = &r.push_url {
                check_git_url(format!("repos[{i}].push_url"), u)?;
            }
        }
        Ok(())
    }

    fn validate_dev(&self) -> Res {
        if self.dev.len() > MAX_DEV {
            return err("dev", format!("at most {MAX_DEV} dev commands"));
        }
        for (i, d) in self.dev.iter().enumerate() {
            check_dev_name(format!("dev[{i}].name"), &d.name)?;
            if d.name == OPENCODE_DEV_NAME {
                return err(
                    format!("dev[{i}].name"),
                    format!(
                        "{OPENCODE_DEV_NAME:?} is the OpenCode server prebuilds start; choose another name"
                    ),
                );
            }
            if self.dev[..i].iter().any(|o| o.name == d.name) {
                return err(
                    format!("dev[{i}].name"),
                    format!("{:?} is used by another dev command", d.name),
                );
            }
            check_command(format!("dev[{i}].command"), &d.command)?;
            if d.port == Some(0) {
                return err(format!("dev[{i}].port"), "0 is not a port; use 1 to 65535");
            }
            if let Some(cwd) = &d.cwd {
                check_abs_or_root(format!("dev[{i}].cwd"), cwd)?;
            }
            check_env(&format!("dev[{i}].env"), d.env.iter())?;
        }
        Ok(())
    }

    fn validate_secrets(&self) -> Res {
        let s = &self.secrets;
        check_env("secrets.env", s.env.keys().map(|k| (k, "")))?;
        for (k, r) in &s.env {
            check_secret_name(format!("secrets.env.{k}.secret"), &r.secret)?;
        }
        if s.files.len() > MAX_SECRET_FILES {
            return err(
                "secrets.files",
                format!("at most {MAX_SECRET_FILES} secret files"),
            );
        }
        for (i, f) in s.files.iter().enumerate() {
            check_abs(format!("secrets.files[{i}].path"), &f.path)?;
            if let Some(j) = s.files[..i].iter().position(|o| o.path == f.path) {
                return err(
                    format!("secrets.files[{i}].path"),
                    format!("{} is already the path of secrets.files[{j}]", f.path),
                );
            }
            check_secret_name(format!("secrets.files[{i}].secret"), &f.secret)?;
            if parse_mode(&f.mode).is_none() {
                return err(
                    format!("secrets.files[{i}].mode"),
                    format!(
                        "{:?} is not a file mode; write octal permission bits such as \"0600\" (at most \"0777\")",
                        f.mode
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_opencode_keys(&self) -> Res {
        if self.opencode_keys.len() > MAX_OPENCODE_KEYS {
            return err(
                "opencode_keys",
                format!("at most {MAX_OPENCODE_KEYS} provider keys"),
            );
        }
        for (provider, secret) in &self.opencode_keys {
            let ok = !provider.is_empty()
                && provider.len() <= 64
                && provider
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
                && provider.as_bytes()[0].is_ascii_alphanumeric();
            if !ok {
                return err(
                    format!("opencode_keys.{provider}"),
                    "a provider id is 1 to 64 of a-z, A-Z, 0-9, '.', '_' and '-', starting with a letter or digit (e.g. anthropic)",
                );
            }
            check_secret_name(format!("opencode_keys.{provider}"), secret)?;
        }
        if self.opencode_server == Some(false) && !self.opencode_keys.is_empty() {
            return err(
                "opencode_keys",
                "provider keys go to the OpenCode server, which opencode_server: false turns off; remove one of them",
            );
        }
        Ok(())
    }

    /// Every secret this definition references (env, files, repository
    /// credentials, OpenCode provider keys).
    pub fn secret_names(&self) -> BTreeSet<String> {
        let env = self.secrets.env.values().map(|r| r.secret.clone());
        let files = self.secrets.files.iter().map(|f| f.secret.clone());
        let creds = self.repos.iter().filter_map(|r| r.credentials.clone());
        let keys = self.opencode_keys.values().cloned();
        env.chain(files).chain(creds).chain(keys).collect()
    }

    /// SHA-256 (hex) of the definition's canonical JSON (defaults filled in, object
    /// keys sorted): equal definitions hash equal however they were written. It
    /// covers what a prebuild is made from: `budget` and `templates`, read when
    /// tasks run, are left out, so changing them rebuilds nothing.
    pub fn content_hash(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(m) = value.as_object_mut() {
            m.remove("budget");
            m.remove("templates");
        }
        let text = canonical(value).to_string();
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

/// Rebuilds every object with its keys in sorted order (independent of whether
/// serde_json preserves insertion order in this build).
fn canonical(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: BTreeMap<String, serde_json::Value> =
                m.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(canonical).collect())
        }
        other => other,
    }
}

/// Checks a secret name: 1 to 64 of `a-z`, `0-9`, `.`, `_` and `-`, starting with a
/// letter or digit.
pub fn validate_secret_name(name: &str) -> Res {
    check_secret_name("name", name)
}

fn check_secret_name(field: impl Into<Cow<'static, str>>, name: &str) -> Res {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        err(
            field,
            format!(
                "{name:?} is not a secret name: use 1 to 64 of a-z, 0-9, '.', '_' and '-', \
                 starting with a letter or digit"
            ),
        )
    }
}

fn check_dev_name(field: String, name: &str) -> Res {
    let ok = !name.is_empty()
        && name.len() <= 30
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        err(
            field,
            format!(
                "{name:?} is not a dev command name: use 1 to 30 of a-z, 0-9 and '-', starting with a letter"
            ),
        )
    }
}

fn check_command(field: String, cmd: &str) -> Res {
    if cmd.trim().is_empty() {
        return err(field, "is empty; write a shell command");
    }
    if cmd.len() > MAX_COMMAND_BYTES {
        return err(
            field,
            format!(
                "is {} bytes; at most {MAX_COMMAND_BYTES} (put long scripts in the repository)",
                cmd.len()
            ),
        );
    }
    if cmd.contains('\0') {
        return err(field, "contains a NUL byte");
    }
    Ok(())
}

fn check_env<'a, V: AsRef<str> + 'a>(
    field: &str,
    vars: impl Iterator<Item = (&'a String, V)>,
) -> Res {
    for (n, (k, v)) in vars.enumerate() {
        if n >= MAX_ENV {
            return err(field.to_owned(), format!("at most {MAX_ENV} variables"));
        }
        let valid = k
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && k.len() <= 256;
        if !valid {
            return err(
                format!("{field}.{k}"),
                format!(
                    "{k:?} is not an environment variable name: use letters, digits and '_', not starting with a digit"
                ),
            );
        }
        let v = v.as_ref();
        if v.contains('\0') || v.len() > MAX_COMMAND_BYTES {
            return err(
                format!("{field}.{k}"),
                format!("the value must be at most {MAX_COMMAND_BYTES} bytes without NUL"),
            );
        }
    }
    Ok(())
}

fn check_abs(field: String, p: &str) -> Res {
    if p == "/" {
        return err(field, "\"/\" is not allowed; name a directory below it");
    }
    check_abs_or_root(field, p)
}

fn check_abs_or_root(field: String, p: &str) -> Res {
    let ok = p.starts_with('/')
        && p.len() <= MAX_PATH_LEN
        && !p.chars().any(char::is_control)
        && !p.split('/').any(|c| c == "..");
    if ok {
        Ok(())
    } else {
        err(
            field,
            format!("{p:?} must be an absolute guest path (starting with /) without '..'"),
        )
    }
}

fn parse_mode(mode: &str) -> Option<u32> {
    if mode.is_empty() || mode.len() > 4 || !mode.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(mode, 8).ok().filter(|m| *m <= 0o777)
}

fn check_git_url(field: String, url: &str) -> Res {
    let bad = |why: &str| {
        err(
            field.clone(),
            format!(
                "{url:?} is not a git URL ({why}); use http(s)://, git://, ssh:// or user@host:path"
            ),
        )
    };
    if url.is_empty() {
        return bad("it is empty");
    }
    if url.len() > MAX_URL_LEN {
        return bad("it is longer than 2048 characters");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it contains whitespace or control characters");
    }
    for scheme in ["http://", "https://", "git://", "ssh://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if host.is_empty() || host.starts_with('-') {
                return bad("it has no host");
            }
            if path.is_empty() {
                return bad("it has no repository path");
            }
            return Ok(());
        }
    }
    if url.contains("://") {
        return bad("unsupported scheme");
    }
    // scp-like: user@host:path, with no '/' before the ':'.
    let Some((user_host, path)) = url.split_once(':') else {
        return bad("no scheme");
    };
    let Some((user, host)) = user_host.split_once('@') else {
        return bad("no scheme, and not user@host:path");
    };
    if user.is_empty()
        || host.is_empty()
        || user.starts_with('-')
        || host.starts_with('-')
        || user_host.contains('/')
        || path.is_empty()
    {
        return bad("not user@host:path");
    }
    Ok(())
}

/// A basic form of `git check-ref-format` for branch names.
fn check_ref_name(field: String, name: &str) -> Res {
    let bad = |why: &str| {
        err(
            field.clone(),
            format!("{name:?} is not a valid branch name: {why}"),
        )
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 255 {
        return bad("it is longer than 255 characters");
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == ' ' || "~^:?*[\\".contains(c))
    {
        return bad("it contains a space, a control character or one of ~ ^ : ? * [ \\");
    }
    if name.contains("..") || name.contains("@{") || name == "@" || name.contains("//") {
        return bad("it contains '..', '@{' or '//', or is '@'");
    }
    if name.starts_with('-') || name.starts_with('/') || name.ends_with('/') || name.ends_with('.')
    {
        return bad("it starts with '-' or '/', or ends with '/' or '.'");
    }
    if name
        .split('/')
        .any(|c| c.starts_with('.') || c.ends_with(".lock"))
    {
        return bad("a component starts with '.' or ends with '.lock'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name: demo
image: dev-base
resources: { vcpus: 2, memory_mib: 2048, disk_gib: 10 }
repos:
  - url: http://10.0.0.1:9418/demo.git
    branch: main
    path: /workspace/demo
init:
  - npm ci
dev:
  - { name: web, command: "npm run dev", port: 3000 }
secrets:
  env: { API_KEY: { secret: demo-api-key } }
  files: [ { path: /root/.npmrc, secret: demo-npmrc, mode: "0600" } ]
opencode: { model: "provider/model" }
"#;

    #[test]
    fn example_parses() {
        let s = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        assert_eq!(s.name, "demo");
        assert_eq!(s.resources, Resources::default());
        assert_eq!(s.repos[0].branch, "main");
        assert_eq!(s.dev[0].port, Some(3000));
        assert_eq!(s.secrets.files[0].mode_bits(), Some(0o600));
        assert_eq!(s.opencode["model"], "provider/model");
        assert_eq!(s.egress, crate::EgressPolicy::AllowAll);
        assert_eq!(
            s.secret_names().into_iter().collect::<Vec<_>>(),
            ["demo-api-key", "demo-npmrc"]
        );
    }

    #[test]
    fn defaults_and_json_input() {
        let s = WorkspaceSpec::from_yaml(r#"{"name": "x", "opencode": null}"#).unwrap();
        assert_eq!(s.image, "dev-base");
        assert_eq!(s.resources.memory_mib, 2048);
        assert!(is_empty_object(&s.opencode));
        let s = WorkspaceSpec::from_yaml(
            "name: x\nrepos: [{url: 'git@github.com:o/r.git', path: /w}]\n\
             secrets: {files: [{path: /a, secret: s}]}\nresources: {vcpus: 4}\n\
             egress: {allow: [github.com]}\n",
        )
        .unwrap();
        assert_eq!(s.repos[0].branch, "main");
        assert_eq!(s.secrets.files[0].mode, "0600");
        assert_eq!(s.resources.vcpus, 4);
        assert_eq!(s.resources.disk_gib, 10);
        assert!(s.egress.allows("github.com"));
    }

    #[test]
    fn opencode_server_and_keys() {
        let s =
            WorkspaceSpec::from_yaml("name: x\nopencode_keys: {local: model-key, anthropic: ak}\n")
                .unwrap();
        assert_eq!(s.opencode_server, None);
        assert_eq!(s.opencode_keys["local"], "model-key");
        assert!(s.secret_names().contains("model-key") && s.secret_names().contains("ak"));
        let off = WorkspaceSpec::from_yaml("name: x\nopencode_server: false\n").unwrap();
        assert_eq!(off.opencode_server, Some(false));
        let both = WorkspaceSpec::from_yaml(
            "name: x\nopencode_server: false\nopencode_keys: {local: k}\n",
        )
        .unwrap_err();
        assert_eq!(both.field, "opencode_keys");
        // Left out, the new fields do not change the hash of existing definitions.
        let plain = WorkspaceSpec::from_yaml("name: x\n").unwrap();
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("opencode_server").is_none() && json.get("opencode_keys").is_none());
    }

    #[test]
    fn json_round_trip_and_hash_is_canonical() {
        let a = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        let b: WorkspaceSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.content_hash(), b.content_hash());
        assert_eq!(a.content_hash().len(), 64);
        // Defaults written out or left implicit hash the same; key order does not matter.
        let c = WorkspaceSpec::from_yaml(
            "name: x\nopencode: {b: 1, a: {d: 2, c: 3}}\nimage: dev-base\n",
        )
        .unwrap();
        let d = WorkspaceSpec::from_yaml("opencode: {a: {c: 3, d: 2}, b: 1}\nname: x\n").unwrap();
        assert_eq!(c.content_hash(), d.content_hash());
        let mut e = d.clone();
        e.init.push("true".into());
        assert_ne!(d.content_hash(), e.content_hash());
        // Budget and templates are read at task time: no new revision for them.
        let f = WorkspaceSpec::from_yaml(
            "opencode: {a: {c: 3, d: 2}, b: 1}\nname: x\nbudget: {usd: 3}\ntemplates: {quick: {title: q, prompt: p}}\n",
        )
        .unwrap();
        assert_eq!(d.content_hash(), f.content_hash());
        assert_ne!(
            serde_json::to_string(&d).unwrap(),
            serde_json::to_string(&f).unwrap()
        );
    }

    #[test]
    fn budget_and_templates_are_validated_with_their_field() {
        let good = format!(
            "{EXAMPLE}budget: {{ usd: 12.5, tokens: 2000000 }}\ntemplates:\n  implementation:\n    title: Ours\n    prompt: \"Do {{{{task.description}}}} on {{{{branch}}}}\"\n    attention_timeout_secs: 30\n"
        );
        let s = WorkspaceSpec::from_yaml(&good).unwrap();
        assert_eq!(s.budget.unwrap().usd, Some(12.5));
        let t = s.template("implementation").unwrap();
        assert_eq!(
            (t.name.as_str(), t.attention_timeout_secs),
            ("implementation", Some(30))
        );
        assert!(s.template("security-review").is_none());
        let cases = [
            ("budget: { usd: -1 }\n", "budget.usd"),
            ("budget: { tokens: 0 }\n", "budget.tokens"),
            ("budget: {}\n", "budget"),
            ("budget: { dollars: 3 }\n", "unknown field `dollars`"),
            (
                "templates: { impl: { title: t, prompt: \"{{task.descripton}}\" } }\n",
                "templates.impl.prompt: unknown placeholder {{task.descripton}}",
            ),
            (
                "templates: { impl: { title: t, prompt: \"  \" } }\n",
                "templates.impl.prompt: must not be empty",
            ),
            (
                "templates: { impl: { name: other, title: t, prompt: p } }\n",
                "templates.impl.name",
            ),
            (
                "templates: { Bad_Name: { title: t, prompt: p } }\n",
                "templates.Bad_Name",
            ),
            (
                "templates: { impl: { title: t, prompt: p, efforts: { extreme: {} } } }\n",
                "unknown variant `extreme`",
            ),
            (
                "templates: { impl: { title: t, prompt: p, default_effort: huge } }\n",
                "unknown variant `huge`",
            ),
        ];
        for (extra, needle) in cases {
            let e = WorkspaceSpec::from_yaml(&format!("{EXAMPLE}{extra}")).unwrap_err();
            assert!(e.to_string().contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let base: serde_json::Value = serde_norway::from_str(EXAMPLE).unwrap();
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("/name", "Bad_Name".into(), "name"),
            ("/image", "".into(), "image"),
            ("/resources/vcpus", 0.into(), "resources.vcpus"),
            ("/resources/vcpus", 9.into(), "resources.vcpus"),
            ("/resources/memory_mib", 100.into(), "resources.memory_mib"),
            ("/resources/disk_gib", 0.into(), "resources.disk_gib"),
            ("/resources/disk_gib", 513.into(), "resources.disk_gib"),
            ("/repos/0/path", "workspace/demo".into(), "repos[0].path"),
            ("/repos/0/path", "/".into(), "repos[0].path"),
            ("/repos/0/path", "/a/../b".into(), "repos[0].path"),
            ("/repos/0/url", "file:///etc".into(), "repos[0].url"),
            ("/repos/0/url", "/srv/repo.git".into(), "repos[0].url"),
            ("/repos/0/url", "http://x/a b".into(), "repos[0].url"),
            (
                "/repos/0/url",
                "ssh://-oProxyCommand=x/r".into(),
                "repos[0].url",
            ),
            ("/repos/0/url", "-o@h:p".into(), "repos[0].url"),
            ("/repos/0/branch", "a..b".into(), "repos[0].branch"),
            ("/repos/0/branch", "-x".into(), "repos[0].branch"),
            ("/repos/0/branch", "x.lock".into(), "repos[0].branch"),
            (
                "/repos/0/credentials",
                "Bad Name".into(),
                "repos[0].credentials",
            ),
            ("/init/0", "".into(), "init[0]"),
            ("/init/0", "x".repeat(16 * 1024 + 1).into(), "init[0]"),
            ("/dev/0/name", "Web".into(), "dev[0].name"),
            ("/dev/0/name", "a".repeat(31).into(), "dev[0].name"),
            ("/dev/0/name", "1web".into(), "dev[0].name"),
            ("/dev/0/name", "opencode".into(), "dev[0].name"),
            (
                "/opencode_keys",
                serde_json::json!({"bad/id": "k"}),
                "opencode_keys.bad/id",
            ),
            (
                "/opencode_keys",
                serde_json::json!({"local": "Bad Name"}),
                "opencode_keys.local",
            ),
            ("/dev/0/port", 0.into(), "dev[0].port"),
            ("/dev/0/cwd", "rel".into(), "dev[0].cwd"),
            ("/dev/0/command", " ".into(), "dev[0].command"),
            (
                "/secrets/files/0/mode",
                "999".into(),
                "secrets.files[0].mode",
            ),
            (
                "/secrets/files/0/mode",
                "1777".into(),
                "secrets.files[0].mode",
            ),
            (
                "/secrets/files/0/path",
                ".npmrc".into(),
                "secrets.files[0].path",
            ),
            (
                "/secrets/files/0/secret",
                "-x".into(),
                "secrets.files[0].secret",
            ),
            (
                "/secrets/env/API_KEY/secret",
                "UPPER".into(),
                "secrets.env.API_KEY.secret",
            ),
            ("/opencode", 3.into(), "opencode"),
            ("/egress", serde_json::json!({"allow": []}), "egress"),
        ];
        for (ptr, value, field) in cases {
            let mut doc = base.clone();
            let (parent, key) = ptr.rsplit_once('/').unwrap();
            match doc.pointer_mut(parent).unwrap() {
                serde_json::Value::Array(a) => a[key.parse::<usize>().unwrap()] = value.clone(),
                serde_json::Value::Object(m) => {
                    m.insert(key.to_owned(), value.clone());
                }
                other => panic!("{parent} is {other}"),
            }
            let spec: WorkspaceSpec = match serde_json::from_value(doc.clone()) {
                Ok(s) => s,
                Err(e) => {
                    // Deserialize-time checks (the egress list) name their field too.
                    assert!(e.to_string().contains(field), "{ptr}: {e}");
                    continue;
                }
            };
            let e = spec.validate().unwrap_err();
            assert_eq!(e.field, *field, "{ptr} = {value}: {e}");
            assert!(e.to_string().contains(*field), "{e}");
        }
    }

    #[test]
    fn duplicates_and_env_names_are_refused() {
        let mut s = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        s.repos.push(s.repos[0].clone());
        assert_eq!(s.validate().unwrap_err().field, "repos[1].path");
        let mut s = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        s.dev.push(s.dev[0].clone());
        assert_eq!(s.validate().unwrap_err().field, "dev[1].name");
        let mut s = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        s.secrets.files.push(s.secrets.files[0].clone());
        assert_eq!(s.validate().unwrap_err().field, "secrets.files[1].path");
        let mut s = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        s.secrets
            .env
            .insert("1BAD".into(), SecretRef { secret: "x".into() });
        assert_eq!(s.validate().unwrap_err().field, "secrets.env.1BAD");
        let mut s = WorkspaceSpec::from_yaml(EXAMPLE).unwrap();
        s.dev[0].env.insert("A-B".into(), "v".into());
        assert_eq!(s.validate().unwrap_err().field, "dev[0].env.A-B");
    }

    #[test]
    fn parse_errors_name_the_key_and_position() {
        for (doc, needle) in [
            ("name: x\nimagee: y\n", "imagee"),
            ("name: x\nresources: {cpus: 1}\n", "cpus"),
            (
                "name: x\ndev: [{name: a, command: b, port: 70000}]\n",
                "port",
            ),
            ("image: x\n", "name"),
            ("name: [\n", "line"),
        ] {
            let e = WorkspaceSpec::from_yaml(doc).unwrap_err();
            assert!(e.to_string().contains(needle), "{doc:?}: {e}");
        }
        let e = WorkspaceSpec::from_yaml("name: x\nimagee: y\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn url_and_name_forms() {
        for ok in [
            "https://github.com/o/r.git",
            "http://10.0.0.1:9418/demo.git",
            "git://host/r",
            "ssh://git@host:22/r.git",
            "git@github.com:o/r.git",
        ] {
            check_git_url("u".into(), ok).unwrap();
        }
        for bad in [
            "",
            "github.com/o/r",
            "https://",
            "https:///r",
            "ext::sh",
            "h:p",
        ] {
            assert!(check_git_url("u".into(), bad).is_err(), "{bad}");
        }
        for ok in ["main", "feature/x", "v1.2"] {
            check_ref_name("b".into(), ok).unwrap();
        }
        for ok in ["a", "0", "demo-api-key", "a.b_c"] {
            validate_secret_name(ok).unwrap();
        }
        for bad in ["", ".a", "-a", "A", "a b", &"a".repeat(65)] {
            assert!(validate_secret_name(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("0777"), Some(0o777));
        assert_eq!(parse_mode("8"), None);
        assert_eq!(parse_mode("01000"), None);
    }
}
