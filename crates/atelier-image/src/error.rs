//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

/// A named stage of an image build, used in progress events and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Checking host tools, resolving package versions, computing the image hash.
    Prepare,
    /// Creating the Debian root tree with debootstrap.
    Debootstrap,
    /// Downloading and unpacking the Debian cloud kernel, installing its modules.
    Kernel,
    /// Fetching the recipe's npm packages on the host and copying them into the tree.
    Npm,
    /// Installing the agent and the image's own files into the root tree.
    Configure,
    /// Writing the initramfs (busybox, root-device modules, `/init`).
    Initramfs,
    /// Turning the root tree into `rootfs.ext4` with `mkfs.ext4 -d`.
    RootfsImage,
    /// Writing `image.json` and publishing the image directory.
    Finish,
}

impl Step {
    /// Every step in build order.
    pub const ALL: [Step; 8] = [
        Step::Prepare,
        Step::Debootstrap,
        Step::Kernel,
        Step::Npm,
        Step::Configure,
        Step::Initramfs,
        Step::RootfsImage,
        Step::Finish,
    ];

    /// Short lowercase name of the step, as shown to users.
    pub fn name(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::Debootstrap => "debootstrap",
            Step::Kernel => "kernel",
            Step::Npm => "npm packages",
            Step::Configure => "configure",
            Step::Initramfs => "initramfs",
            Step::RootfsImage => "rootfs image",
            Step::Finish => "finish",
        }
    }

    /// Position of the step in [`Step::ALL`] (0-based).
    pub fn index(self) -> usize {
        Step::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong while building, finding or removing images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The requested recipe name is not known.
    #[error("unknown image recipe `{name}`; known recipes: {}", known.join(", "))]
    UnknownRecipe {
        /// The name that was asked for.
        name: String,
        /// Names of all known recipes.
        known: Vec<String>,
    },

    /// A program the build needs is not installed on the host.
    #[error(
        "{step}: host tool `{tool}` not found in PATH; install it with `apt-get install {package}`"
    )]
    MissingTool {
        /// Step that needed the tool.
        step: Step,
        /// Program name.
        tool: String,
        /// Debian package that provides it.
        package: String,
    },

    /// A host command could not be started.
    #[error("{step}: cannot run `{command}`: {source}")]
    Spawn {
        /// Step that ran the command.
        step: Step,
        /// The command line.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },

    /// A host command exited with a failure status.
    #[error("{step}: `{command}` failed ({status}){}: {stderr_tail}", log.as_ref().map(|l| format!(", full log in {}", l.display())).unwrap_or_default())]
    Command {
        /// Step that ran the command.
        step: Step,
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// The last lines of its output.
        stderr_tail: String,
        /// A log file with the complete output, when one was kept.
        log: Option<PathBuf>,
    },

    /// A file system operation failed.
    #[error("{step}: cannot {op} {}: {source}", path.display())]
    Io {
        /// Step that did the operation.
        step: Step,
        /// What was being done (e.g. "write", "create directory").
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// The agent binary given in the options is unusable.
    #[error("agent binary {}: {reason}", path.display())]
    AgentBinary {
        /// Path from the options.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The kernel or another Debian package could not be resolved through apt on the host.
    #[error(
        "{step}: cannot resolve Debian package `{package}`: {detail}; run `apt-get update` and check the apt sources"
    )]
    PackageResolve {
        /// Step that resolved the package.
        step: Step,
        /// Package name.
        package: String,
        /// What went wrong.
        detail: String,
    },

    /// The kernel package does not have the expected layout or modules.
    #[error("kernel {kernel}: {detail}")]
    Kernel {
        /// Kernel release or package.
        kernel: String,
        /// What is wrong.
        detail: String,
    },

    /// An `image.json` could not be read or written.
    #[error("image manifest {}: {detail}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// The build was started without root privileges.
    #[error("image builds must run as root (debootstrap and chroot need it)")]
    NotRoot,

    /// No image with that name (or name-hash id) exists.
    #[error("no image `{id}` in {}", images_dir.display())]
    NotFound {
        /// The name or `name-hash12` id asked for.
        id: String,
        /// The images directory searched.
        images_dir: PathBuf,
    },
}

impl ImageError {
    /// The step the error happened in, when it belongs to one.
    pub fn step(&self) -> Option<Step> {
        match self {
            ImageError::MissingTool { step, .. }
            | ImageError::Spawn { step, .. }
            | ImageError::Command { step, .. }
            | ImageError::Io { step, .. }
            | ImageError::PackageResolve { step, .. } => Some(*step),
            ImageError::Kernel { .. } => Some(Step::Kernel),
            ImageError::UnknownRecipe { .. }
            | ImageError::AgentBinary { .. }
            | ImageError::Manifest { .. }
            | ImageError::NotRoot
            | ImageError::NotFound { .. } => None,
        }
    }
}

/// Shorthand for building an [`ImageError::Io`] in `map_err`.
pub(crate) fn io_err(
    step: Step,
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io {
        step,
        op,
        path,
        source,
    }
}
