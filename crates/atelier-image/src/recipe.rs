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
    /// Paths (relative to the root, trailing `/*` means "the contents of") removed to save space.
    pub prune: &'static [&'static str],
    /// Free space left in `rootfs.ext4` beyond its content, in MiB.
    pub headroom_mib: u64,
}

const MINIMAL: Recipe = Recipe {
    name: "minimal",
    description: "Debian bookworm minbase with the agent; for tests",
    suite: "bookworm",
    variant: "minbase",
    packages: &["ca-certificates", "iproute2", "kmod", "procps"],
    // The generic kernel, not the cloud one: only it has 9p (host folder sharing
    // with QEMU's built-in virtio-9p; the cloud kernel has virtiofs, which needs a
    // virtiofsd Debian 12 does not package). Hardware drivers are pruned below.
    kernel_package: "linux-image-amd64",
    kernel_release: None,
    // ext4 and the crc32c it needs (a soft dependency modules.dep does not list) are
    // modules in the generic kernel.
    initramfs_modules: &[
        "virtio_mmio",
        "virtio_pci",
        "virtio_blk",
        "virtio_console",
        "crc32c_generic",
        "ext4",
    ],
    files: &[ExtraFile {
        path: "/etc/fstab",
        mode: 0o644,
        contents: "/dev/vda / ext4 rw,relatime 0 1\n",
    }],
    prune: &[
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
    ],
    headroom_mib: 1024,
};

/// All recipes this build of the crate knows.
pub const RECIPES: &[Recipe] = &[MINIMAL];

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
}
