//! npm packages: installed on the host with the host's npm into a cache, then copied
//! into the root tree (the guest needs no network and no npm of its own to build).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::cmd;
use crate::error::io_err;
use crate::recipe::{NpmInstall, NpmLayout};
use crate::rootfs::{copy_tree, tree_path};
use crate::{ImageError, Step};

const STEP: Step = Step::Npm;

/// Directory name of a cached install: `@oven/bun-linux-x64@1.4.5` -> `@oven+bun-linux-x64@1.4.5`.
pub(crate) fn cache_key(inst: &NpmInstall) -> String {
    format!("{}@{}", inst.package.replace('/', "+"), inst.version)
}

/// The directory of the package itself inside an install prefix.
pub(crate) fn package_dir(prefix: &Path, package: &str) -> PathBuf {
    package
        .split('/')
        .fold(prefix.join("node_modules"), |p, c| p.join(c))
}

/// Returns the cached install prefix of `inst` under `cache_dir/npm/installs/`,
/// running `npm install` first when it is not there. Install scripts are not run:
/// they would run under the host's Node, and some download from the web.
/// The returned flag says whether npm ran.
pub(crate) fn fetch(
    inst: &NpmInstall,
    cache_dir: &Path,
    on_line: &(dyn Fn(&str) + Sync),
) -> Result<(PathBuf, bool), ImageError> {
    let root = cache_dir.join("npm");
    let installs = root.join("installs");
    let key = cache_key(inst);
    let done = installs.join(&key);
    if package_dir(&done, inst.package).is_dir() {
        return Ok((done, false));
    }
    let npm = cmd::require_tool(STEP, "npm", "npm")?;
    let logs = root.join("logs");
    for d in [&installs, &logs] {
        fs::create_dir_all(d).map_err(io_err(STEP, "create directory", d))?;
    }
    let tmp = installs.join(format!(".tmp-{key}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(STEP, "remove", &tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(STEP, "create directory", &tmp))?;
    let mut c = cmd::command(
        npm,
        [
            "install",
            "--ignore-scripts",
            "--save-exact",
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
            "--prefix",
        ],
    );
    c.arg(&tmp)
        .arg(inst.spec())
        .current_dir(&tmp)
        // This host's npmrc sets `yes=false`; npm must not stop to ask.
        .env("npm_config_yes", "true")
        .env("npm_config_engine_strict", "false")
        .env("npm_config_cache", root.join("cache"));
    let log = logs.join(format!("{key}.log"));
    let result = cmd::run_logged(STEP, &mut c, &log, on_line).and_then(|()| {
        if package_dir(&tmp, inst.package).is_dir() {
            Ok(())
        } else {
            Err(ImageError::Io {
                step: STEP,
                op: "find the installed package in",
                path: package_dir(&tmp, inst.package),
                source: std::io::ErrorKind::NotFound.into(),
            })
        }
    });
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // The rename publishes a complete install; a concurrent build may have won.
    if fs::rename(&tmp, &done).is_err() {
        let _ = fs::remove_dir_all(&tmp);
        if !package_dir(&done, inst.package).is_dir() {
            return Err(ImageError::Io {
                step: STEP,
                op: "publish npm install",
                path: done,
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
    }
    Ok((done, true))
}

/// Copies a fetched install into the tree at `inst.dest` (replacing what is there)
/// and creates its links. Returns the bytes copied.
pub(crate) fn install(tree: &Path, inst: &NpmInstall, prefix: &Path) -> Result<u64, ImageError> {
    let src = match inst.layout {
        NpmLayout::Package => package_dir(prefix, inst.package),
        NpmLayout::Prefix => prefix.to_path_buf(),
    };
    let dest = tree_path(STEP, tree, inst.dest)?;
    if dest.symlink_metadata().is_ok() {
        fs::remove_dir_all(&dest).map_err(io_err(STEP, "remove", &dest))?;
    }
    let bytes = copy_tree(STEP, &src, &dest)?;
    for b in inst.bins {
        let target = dest.join(b.target);
        let md = fs::metadata(&target).map_err(io_err(
            STEP,
            "find the file an npm bin links to (check the recipe) at",
            &target,
        ))?;
        if !md.is_file() {
            return Err(ImageError::Io {
                step: STEP,
                op: "link to a non-file",
                path: target,
                source: std::io::ErrorKind::InvalidInput.into(),
            });
        }
        let mode = md.permissions().mode();
        if mode & 0o111 != 0o111 {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o755))
                .map_err(io_err(STEP, "make executable", &target))?;
        }
        let link = tree_path(STEP, tree, b.link)?;
        if let Ok(m) = link.symlink_metadata() {
            if m.is_dir() {
                fs::remove_dir_all(&link).map_err(io_err(STEP, "remove", &link))?;
            } else {
                fs::remove_file(&link).map_err(io_err(STEP, "remove", &link))?;
            }
        }
        let guest_target = format!("{}/{}", inst.dest.trim_end_matches('/'), b.target);
        symlink(&guest_target, &link).map_err(io_err(STEP, "create symlink", &link))?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::NpmBin;

    const TOOL: NpmInstall = NpmInstall {
        package: "@acme/tool-linux-x64",
        version: "1.2.3",
        dest: "/opt/tool",
        layout: NpmLayout::Package,
        bins: &[
            NpmBin {
                link: "/usr/local/bin/tool",
                target: "bin/tool",
            },
            NpmBin {
                link: "/opt/tool/bin/alias",
                target: "bin/tool",
            },
        ],
    };

    /// A fake cached install prefix with one scoped package and a dependency.
    fn fake_prefix(root: &Path) -> PathBuf {
        let prefix = root.join("prefix");
        let pkg = package_dir(&prefix, TOOL.package);
        fs::create_dir_all(pkg.join("bin")).unwrap();
        fs::write(pkg.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
        fs::set_permissions(pkg.join("bin/tool"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir_all(prefix.join("node_modules/dep")).unwrap();
        fs::write(prefix.join("node_modules/dep/index.js"), "").unwrap();
        fs::write(prefix.join("package.json"), "{}").unwrap();
        prefix
    }

    #[test]
    fn cache_keys_and_package_dirs() {
        assert_eq!(cache_key(&TOOL), "@acme+tool-linux-x64@1.2.3");
        assert_eq!(
            package_dir(Path::new("/p"), "@acme/tool"),
            Path::new("/p/node_modules/@acme/tool")
        );
        assert_eq!(
            package_dir(Path::new("/p"), "npm"),
            Path::new("/p/node_modules/npm")
        );
    }

    #[test]
    fn cached_install_is_reused_without_npm() {
        let t = tempfile::tempdir().unwrap();
        let cached = t.path().join("npm/installs").join(cache_key(&TOOL));
        fs::create_dir_all(package_dir(&cached, TOOL.package)).unwrap();
        let (p, ran) = fetch(&TOOL, t.path(), &|_| {}).unwrap();
        assert_eq!(p, cached);
        assert!(!ran);
    }

    #[test]
    fn package_layout_copies_the_package_and_links_bins() {
        let t = tempfile::tempdir().unwrap();
        let prefix = fake_prefix(t.path());
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("opt/tool/stale")).unwrap();
        install(&tree, &TOOL, &prefix).unwrap();
        assert!(!tree.join("opt/tool/stale").exists(), "dest is replaced");
        assert!(!tree.join("opt/tool/node_modules").exists());
        let bin = tree.join("opt/tool/bin/tool");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        for link in ["usr/local/bin/tool", "opt/tool/bin/alias"] {
            assert_eq!(
                fs::read_link(tree.join(link)).unwrap(),
                Path::new("/opt/tool/bin/tool"),
                "{link}"
            );
        }
        // Installing again replaces links and files.
        install(&tree, &TOOL, &prefix).unwrap();
        assert!(tree.join("usr/local/bin/tool").symlink_metadata().is_ok());
    }

    #[test]
    fn prefix_layout_copies_dependencies() {
        let t = tempfile::tempdir().unwrap();
        let prefix = fake_prefix(t.path());
        let tree = t.path().join("tree");
        let inst = NpmInstall {
            layout: NpmLayout::Prefix,
            dest: "/root/.config/tool",
            bins: &[NpmBin {
                link: "/usr/local/bin/tool",
                target: "node_modules/@acme/tool-linux-x64/bin/tool",
            }],
            ..TOOL
        };
        install(&tree, &inst, &prefix).unwrap();
        assert!(tree.join("root/.config/tool/package.json").is_file());
        assert!(
            tree.join("root/.config/tool/node_modules/dep/index.js")
                .is_file()
        );
        assert_eq!(
            fs::read_link(tree.join("usr/local/bin/tool")).unwrap(),
            Path::new("/root/.config/tool/node_modules/@acme/tool-linux-x64/bin/tool")
        );
    }

    #[test]
    fn missing_bin_target_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let prefix = fake_prefix(t.path());
        let inst = NpmInstall {
            bins: &[NpmBin {
                link: "/usr/local/bin/nope",
                target: "bin/nope",
            }],
            ..TOOL
        };
        let err = install(&t.path().join("tree"), &inst, &prefix).unwrap_err();
        assert_eq!(err.step(), Some(Step::Npm));
        assert!(err.to_string().contains("bin/nope"), "{err}");
    }
}
