//! The Debian cloud kernel: resolving it with apt, unpacking it, and module dependencies.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::cmd::{self, command};
use crate::error::io_err;
use crate::{ImageError, Step};

/// A Debian binary package pinned to one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Package {
    pub name: String,
    pub version: String,
}

/// Reads one field of the candidate version of `package` from the host's apt cache.
fn apt_field(
    step: Step,
    package: &str,
    release: Option<&str>,
    field: &str,
) -> Result<String, ImageError> {
    let apt_cache = cmd::require_tool(step, "apt-cache", "apt")?;
    let mut c = command(apt_cache, ["show", "--no-all-versions"]);
    if let Some(r) = release {
        c.arg("-o").arg(format!("APT::Default-Release={r}"));
    }
    c.arg(package);
    let out = cmd::run(step, &mut c).map_err(|e| ImageError::PackageResolve {
        step,
        package: package.to_string(),
        detail: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    control_field(&text, field).ok_or_else(|| ImageError::PackageResolve {
        step,
        package: package.to_string(),
        detail: format!("no `{field}` field in `apt-cache show` output"),
    })
}

/// Returns the value of `field` in a deb822 paragraph.
pub(crate) fn control_field(text: &str, field: &str) -> Option<String> {
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

/// Resolves the candidate version of a plain package.
pub(crate) fn resolve_package(
    step: Step,
    package: &str,
    release: Option<&str>,
) -> Result<Package, ImageError> {
    Ok(Package {
        name: package.to_string(),
        version: apt_field(step, package, release, "Version")?,
    })
}

/// Resolves a kernel metapackage (`linux-image-cloud-amd64`) to the versioned image package
/// it depends on (`linux-image-6.1.0-56-cloud-amd64` at `6.1.192-2`).
pub(crate) fn resolve_kernel(
    metapackage: &str,
    release: Option<&str>,
) -> Result<Package, ImageError> {
    let step = Step::Prepare;
    let depends = apt_field(step, metapackage, release, "Depends")?;
    parse_kernel_depends(&depends).ok_or_else(|| ImageError::PackageResolve {
        step,
        package: metapackage.to_string(),
        detail: format!("no versioned linux-image dependency in `Depends: {depends}`"),
    })
}

/// Picks `linux-image-X (= V)` out of a Depends field.
pub(crate) fn parse_kernel_depends(depends: &str) -> Option<Package> {
    depends.split(',').find_map(|dep| {
        let dep = dep.split('|').next()?.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        if !name.starts_with("linux-image-") {
            return None;
        }
        let version = rest
            .trim()
            .strip_prefix("(=")?
            .trim()
            .strip_suffix(')')?
            .trim();
        Some(Package {
            name: name.to_string(),
            version: version.to_string(),
        })
    })
}

/// Downloads a package (if not cached) and unpacks it under `cache_dir/debs/`,
/// returning the directory holding its contents. Both are reused by later builds.
pub(crate) fn fetch_and_unpack(
    step: Step,
    pkg: &Package,
    cache_dir: &Path,
) -> Result<PathBuf, ImageError> {
    let debs = cache_dir.join("debs");
    let safe_version = pkg.version.replace(':', "%3a");
    let stem = format!("{}_{}", pkg.name, safe_version);
    let unpacked = debs.join(format!("{stem}.d"));
    if unpacked.join(".complete").exists() {
        return Ok(unpacked);
    }
    fs::create_dir_all(&debs).map_err(io_err(step, "create directory", &debs))?;
    let deb = find_deb(&debs, &pkg.name, &safe_version);
    let deb = match deb {
        Some(d) => d,
        None => {
            let apt_get = cmd::require_tool(step, "apt-get", "apt")?;
            let mut c = command(
                apt_get,
                [
                    "-q".to_string(),
                    "-o".to_string(),
                    "APT::Sandbox::User=root".to_string(),
                    "download".to_string(),
                    format!("{}={}", pkg.name, pkg.version),
                ],
            );
            c.current_dir(&debs);
            cmd::run(step, &mut c)?;
            find_deb(&debs, &pkg.name, &safe_version).ok_or_else(|| ImageError::PackageResolve {
                step,
                package: pkg.name.clone(),
                detail: format!(
                    "apt-get download left no {stem}_*.deb in {}",
                    debs.display()
                ),
            })?
        }
    };
    let tmp = debs.join(format!(".{stem}.d.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err(step, "create directory", &tmp))?;
    let dpkg_deb = cmd::require_tool(step, "dpkg-deb", "dpkg")?;
    let res = cmd::run(
        step,
        &mut command(dpkg_deb, ["-x".as_ref(), deb.as_os_str(), tmp.as_os_str()]),
    );
    if let Err(e) = res {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::write(tmp.join(".complete"), b"").map_err(io_err(step, "write", tmp.join(".complete")))?;
    let _ = fs::remove_dir_all(&unpacked);
    fs::rename(&tmp, &unpacked).map_err(io_err(step, "rename into place", &unpacked))?;
    Ok(unpacked)
}

fn find_deb(dir: &Path, name: &str, safe_version: &str) -> Option<PathBuf> {
    let prefix = format!("{name}_{safe_version}_");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// The pieces of an unpacked kernel package.
#[derive(Debug, Clone)]
pub(crate) struct KernelFiles {
    /// Kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// Locates vmlinuz and the modules directory in an unpacked kernel package.
pub(crate) fn locate(unpacked: &Path) -> Result<KernelFiles, ImageError> {
    for base in ["lib/modules", "usr/lib/modules"] {
        let dir = unpacked.join(base);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let release = e.file_name().to_string_lossy().into_owned();
            let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
            if vmlinuz.is_file() {
                return Ok(KernelFiles {
                    release,
                    vmlinuz,
                    modules_dir: e.path(),
                });
            }
        }
    }
    Err(ImageError::Kernel {
        kernel: unpacked.display().to_string(),
        detail: "no boot/vmlinuz-<release> with a matching lib/modules/<release> in the package"
            .to_string(),
    })
}

/// Parsed `modules.dep`: module name -> (path relative to the modules dir, dependency names).
#[derive(Debug, Default, Clone)]
pub(crate) struct ModuleDeps {
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

/// Turns a module path or name into its canonical name (`kernel/x/virtio-blk.ko.xz` -> `virtio_blk`).
pub(crate) fn module_name(path_or_name: &str) -> String {
    let file = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleDeps {
    /// Parses the text of `modules.dep` and, optionally, `modules.builtin`.
    pub(crate) fn parse(modules_dep: &str, modules_builtin: &str) -> Self {
        let mut modules = BTreeMap::new();
        for line in modules_dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin = modules_builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        ModuleDeps { modules, builtin }
    }

    /// Returns the module files (relative paths) needed to load `wanted`, dependencies
    /// first, each once. Built-in modules are skipped; an unknown module is an error.
    pub(crate) fn closure(&self, wanted: &[&str]) -> Result<Vec<String>, String> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for w in wanted {
            let name = module_name(w);
            if self.builtin.contains(&name) && !self.modules.contains_key(&name) {
                continue;
            }
            self.visit(&name, &mut seen, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), String> {
        if seen.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(format!(
                "dependency cycle: {} -> {name}",
                stack.join(" -> ")
            ));
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return Err(format!(
                "module `{name}` is neither in modules.dep nor built in"
            ));
        };
        stack.push(name.to_string());
        for d in deps {
            self.visit(d, seen, stack, order)?;
        }
        stack.pop();
        seen.insert(name.to_string());
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko kernel/fs/fscache/fscache.ko
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/x/a-b.ko: kernel/x/c.ko
kernel/x/c.ko: kernel/x/a-b.ko
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n";

    #[test]
    fn closure_orders_dependencies_first_once() {
        let m = ModuleDeps::parse(DEP, BUILTIN);
        let c = m
            .closure(&["virtio_mmio", "virtio-blk", "virtio_console", "ext4"])
            .unwrap();
        assert_eq!(
            c,
            vec![
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_mmio.ko",
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/drivers/char/virtio_console.ko",
            ]
        );
    }

    #[test]
    fn closure_handles_transitive_dependencies() {
        let m = ModuleDeps::parse(DEP, BUILTIN);
        let c = m.closure(&["9p"]).unwrap();
        let pos = |n: &str| c.iter().position(|p| p.ends_with(n)).unwrap();
        assert!(pos("netfs.ko") < pos("fscache.ko"));
        assert!(pos("fscache.ko") < pos("9p.ko"));
        assert!(pos("9pnet.ko") < pos("9p.ko"));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn closure_reports_unknown_and_cycles() {
        let m = ModuleDeps::parse(DEP, BUILTIN);
        assert!(m.closure(&["nope"]).unwrap_err().contains("`nope`"));
        assert!(m.closure(&["a_b"]).unwrap_err().contains("cycle"));
    }

    #[test]
    fn module_names_are_canonical() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio-blk.ko.zst"),
            "virtio_blk"
        );
        assert_eq!(module_name("ext4"), "ext4");
    }

    #[test]
    fn parses_kernel_depends() {
        let p = parse_kernel_depends("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)").unwrap();
        assert_eq!(p.name, "linux-image-6.1.0-56-cloud-amd64");
        assert_eq!(p.version, "6.1.192-2");
        let p = parse_kernel_depends(
            "foo (>= 1), linux-image-6.12.95+deb12-cloud-amd64 (= 6.12.95-1~bpo12+1)",
        )
        .unwrap();
        assert_eq!(p.version, "6.12.95-1~bpo12+1");
        assert!(parse_kernel_depends("linux-image-foo").is_none());
    }

    #[test]
    fn reads_control_fields() {
        let t = "Package: busybox-static\nVersion: 1:1.35.0-4\nDepends: libc6\n";
        assert_eq!(control_field(t, "Version").as_deref(), Some("1:1.35.0-4"));
        assert_eq!(control_field(t, "Nope"), None);
    }
}
