//! Workspaces whose sandboxes run a real OpenCode against the scripted model
//! server: image `minimal-opencode` (built by `scripts/test.sh` next to `minimal`),
//! an egress allow-list holding only the model's host name (the test's DNS server
//! resolves it into a [`crate::PublicNet`], where [`crate::ModelServer::start_in_netns`]
//! serves), the provider `local` pointing at it, and its key as a secret.

/// The test image with OpenCode.
pub const OPENCODE_IMAGE: &str = "minimal-opencode";

/// Where the tests' images are: `ATELIER_TEST_IMAGES_DIR`, else the cache
/// `scripts/test.sh` builds them into.
pub fn test_images_dir() -> std::path::PathBuf {
    std::env::var_os("ATELIER_TEST_IMAGES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/cache/atelier-test/images"))
}

/// Whether `dir` holds a built [`OPENCODE_IMAGE`] (`minimal-opencode-<hash>`).
pub fn has_opencode_image(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{OPENCODE_IMAGE}-"))
            })
        })
        .unwrap_or(false)
}

/// The OpenCode provider id the scripted model is configured under.
pub const PROVIDER: &str = "local";

/// The model id the scripted model is configured under (`local/scripted`).
pub const MODEL: &str = "scripted";

/// A workspace definition (YAML) for OpenCode against the scripted model at
/// `http://{model_host}:{model_port}/v1`: `key_secret` feeds provider `local`;
/// `repo` (a URL whose host the allow-list must cover too) is cloned into
/// `/workspace/{name}` when given.
pub fn opencode_workspace_yaml(
    name: &str,
    model_host: &str,
    model_port: u16,
    key_secret: &str,
    repo: Option<&str>,
) -> String {
    let repos = repo
        .map(|url| {
            format!("repos:\n  - {{ url: \"{url}\", branch: main, path: /workspace/{name} }}\n")
        })
        .unwrap_or_default();
    format!(
        r#"name: {name}
image: {OPENCODE_IMAGE}
resources: {{ vcpus: 2, memory_mib: 1536, disk_gib: 2 }}
{repos}egress: {{ allow: [ "{model_host}" ] }}
opencode:
  provider:
    {PROVIDER}:
      npm: "@ai-sdk/openai-compatible"
      name: Scripted
      options: {{ baseURL: "http://{model_host}:{model_port}/v1" }}
      models: {{ {MODEL}: {{ name: Scripted }} }}
  model: "{PROVIDER}/{MODEL}"
  small_model: "{PROVIDER}/{MODEL}"
opencode_keys: {{ {PROVIDER}: {key_secret} }}
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_workspace_names_the_model_and_the_key() {
        let y = super::opencode_workspace_yaml(
            "oc",
            "model.test",
            8090,
            "model-key",
            Some("git://model.test/demo.git"),
        );
        assert!(y.contains("opencode_keys: { local: model-key }"), "{y}");
        assert!(y.contains("http://model.test:8090/v1"), "{y}");
        assert!(y.contains("path: /workspace/oc"), "{y}");
        assert!(y.contains(r#"allow: [ "model.test" ]"#), "{y}");
    }

    #[test]
    fn finds_the_opencode_image_by_its_name_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!super::has_opencode_image(dir.path()));
        assert!(!super::has_opencode_image(&dir.path().join("missing")));
        std::fs::create_dir(dir.path().join("minimal-0123abcd")).expect("mkdir");
        assert!(!super::has_opencode_image(dir.path()));
        std::fs::create_dir(dir.path().join("minimal-opencode-0123abcd")).expect("mkdir");
        assert!(super::has_opencode_image(dir.path()));
    }
}
