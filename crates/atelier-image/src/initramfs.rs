//! The initramfs: an uncompressed newc cpio with busybox, the root-device modules and `/init`.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::cmd::{self, command};
use crate::error::io_err;
use crate::{ImageError, Step};

/// Writes newc ("070701") cpio archives.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub(crate) fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) -> io::Result<()> {
        let name_len = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio name too long"))?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_len, 0
        );
        self.ino += 1;
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Adds a directory (`name` without a leading slash).
    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, 0o040000 | perm, 0, (0, 0))
    }

    /// Adds a regular file with the given contents.
    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio file too large"))?;
        self.header(name, 0o100000 | perm, size, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    /// Adds a symlink.
    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let size = u32::try_from(target.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio link too long"))?;
        self.header(name, 0o120777, size, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// Adds a character device node.
    pub(crate) fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.header(name, 0o020000 | perm, 0, (major, minor))
    }

    /// Writes the trailer and returns the underlying writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The `/init` script. `@MODULES@` is replaced with the module file names in load order.
const INIT_TEMPLATE: &str = r#"#!/bin/busybox sh
# Atelier initramfs: load the root-device drivers, mount the root, hand over to the agent.
B=/bin/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

fail() {
    echo "atelier-initramfs: error: $*" >/dev/console 2>/dev/null || echo "atelier-initramfs: error: $*"
    echo "atelier-initramfs: cannot start the guest; powering off" >/dev/console 2>/dev/null
    $B sync
    $B poweroff -f
    $B reboot -f
    while :; do $B sleep 3600; done
}

$B mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
$B mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
$B mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"

root=/dev/vda
rootfstype=ext4
rootflags=
mode=rw
init=/sbin/atelier-agent
for arg in $($B cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
        rootflags=*) rootflags=",${arg#rootflags=}" ;;
        init=*) init="${arg#init=}" ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
    esac
done

for m in @MODULES@; do
    $B insmod "/lib/modules/$m" || fail "cannot load kernel module $m"
done

i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ "$i" -gt 200 ] && fail "root device $root did not appear within 10 s (no virtio-blk disk attached?)"
    $B usleep 50000
done

$B mount -t "$rootfstype" -o "$mode$rootflags" "$root" /newroot \
    || fail "cannot mount $root ($rootfstype, $mode$rootflags) on /newroot"
[ -x "/newroot$init" ] || fail "$init is missing or not executable in the root file system on $root"

for d in dev proc sys; do
    if [ -d "/newroot/$d" ]; then
        $B mount --move "/$d" "/newroot/$d" || fail "cannot move /$d into the root file system"
    fi
done
exec $B switch_root /newroot "$init"
"#;

/// Renders `/init` for the given module file names (already in load order).
pub(crate) fn init_script(module_files: &[String]) -> String {
    INIT_TEMPLATE.replace("@MODULES@", &module_files.join(" "))
}

/// Builds the initramfs at `out` from a busybox binary and module files
/// (`module_paths` relative to `modules_dir`, in load order). Compressed modules
/// are decompressed here so busybox `insmod` can load them.
pub(crate) fn build(
    out: &Path,
    busybox: &Path,
    modules_dir: &Path,
    module_paths: &[String],
) -> Result<u64, ImageError> {
    let step = Step::Initramfs;
    let bb = fs::read(busybox).map_err(io_err(step, "read", busybox))?;
    let mut modules: Vec<(String, Vec<u8>)> = Vec::new();
    for rel in module_paths {
        let src = modules_dir.join(rel);
        let file_name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (name, data) = if let Some(stem) = file_name.strip_suffix(".xz") {
            (stem.to_string(), decompress(step, "xz", "xz-utils", &src)?)
        } else if let Some(stem) = file_name.strip_suffix(".zst") {
            (stem.to_string(), decompress(step, "zstd", "zstd", &src)?)
        } else if let Some(stem) = file_name.strip_suffix(".gz") {
            (stem.to_string(), decompress(step, "gzip", "gzip", &src)?)
        } else {
            (
                file_name,
                fs::read(&src).map_err(io_err(step, "read", &src))?,
            )
        };
        modules.push((name, data));
    }
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    let init = init_script(&names);

    let file = fs::File::create(out).map_err(io_err(step, "create", out))?;
    let write = || -> io::Result<u64> {
        let mut w = CpioWriter::new(io::BufWriter::new(file));
        for d in [
            "bin",
            "dev",
            "etc",
            "lib",
            "lib/modules",
            "newroot",
            "proc",
            "sys",
            "tmp",
        ] {
            w.dir(d, 0o755)?;
        }
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file("bin/busybox", 0o755, &bb)?;
        w.symlink("bin/sh", "busybox")?;
        w.file("init", 0o755, init.as_bytes())?;
        for (name, data) in &modules {
            w.file(&format!("lib/modules/{name}"), 0o644, data)?;
        }
        let w = w.finish()?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(f.metadata()?.len())
    };
    write().map_err(io_err(step, "write initramfs", out))
}

fn decompress(step: Step, tool: &str, package: &str, src: &Path) -> Result<Vec<u8>, ImageError> {
    let prog = cmd::require_tool(step, tool, package)?;
    let out = cmd::run(step, &mut command(prog, ["-dc".as_ref(), src.as_os_str()]))?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/x", 0o755, b"hello").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
        // the file header starts on a 4-byte boundary
        let pos = text.find("070701").unwrap();
        assert_eq!(pos, 0);
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }

    #[test]
    fn init_script_lists_modules_in_order() {
        let s = init_script(&["virtio.ko".into(), "virtio_blk.ko".into()]);
        assert!(s.contains("for m in virtio.ko virtio_blk.ko; do"));
        assert!(s.contains("switch_root /newroot"));
        assert!(!s.contains("@MODULES@"));
    }
}
