//! Builds Atelier guest images: a Debian root file system made with debootstrap and
//! packed as a raw ext4 image, Debian's cloud kernel, and a small initramfs that loads
//! the virtio drivers, mounts `/dev/vda` and hands over to `/sbin/atelier-agent` as PID 1.
//!
//! Images are content-addressed (recipe, agent binary, kernel and busybox package
//! versions, builder version) and cached under `images_dir/<name>-<hash12>/`.
//! Building is blocking and runs host tools (debootstrap, mkfs.ext4, apt, dpkg-deb).
//!
//! This crate must not depend on the manager, the hypervisor backend or the agent
//! crates: it only produces files and describes them in `image.json`.

#![warn(missing_docs)]

mod build;
mod cmd;
mod cmdline;
mod error;
mod initramfs;
mod kernel;
mod npm;
mod progress;
mod recipe;
mod rootfs;
mod store;

pub use build::{BUILDER_VERSION, BuildOptions, DEFAULT_MIRROR, build};
pub use cmdline::{host_tsc_khz, kernel_cmdline};
pub use error::{ImageError, Step};
pub use progress::{Progress, ProgressEvent, TracingProgress, indicatif_progress};
pub use recipe::{ExtraFile, NpmBin, NpmInstall, NpmLayout, RECIPES, Recipe, recipe};
pub use store::{
    INITRD_FILE, Image, ImageManifest, KERNEL_FILE, MANIFEST_FILE, ROOTFS_FILE, find, list, remove,
};
