//! Builds the `dev-base` image for real (downloads cached in `ATELIER_TEST_CACHE`,
//! default `/var/cache/atelier-test`; the image goes to `$ATELIER_TEST_CACHE/dev-images`
//! so it never collides with the `minimal` images of the other tests) and checks its
//! tools without booting a VM: `debugfs` reads the ext4 image, then the image is
//! loop-mounted read-only and `node`, `npm`, `bun`, `opencode`, `git`, `python3` and
//! `gcc` run in a chroot (same architecture as the host).
//! Needs root, debootstrap, npm (host), gcc and the registries (deb.debian.org, npm).

// Test helpers outside #[test] fns panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_image::{BuildOptions, Image, ProgressEvent};

fn cache_root() -> PathBuf {
    std::env::var_os("ATELIER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/atelier-test"))
}

/// A static stand-in agent (the image is not booted here, but the build needs one).
fn shim_agent() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shim_agent.c");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("atelier-shim-agent-dev");
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run gcc (apt-get install gcc libc6-dev)");
    assert!(status.success(), "gcc -static failed for {}", src.display());
    out
}

fn build(opts: &BuildOptions, events: &Mutex<Vec<String>>) -> (Image, Duration) {
    events.lock().unwrap().clear();
    let t = Instant::now();
    let img = atelier_image::build(opts).expect("build dev-base");
    (img, t.elapsed())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn debugfs(rootfs: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(rootfs)
        .output()
        .expect("run debugfs (e2fsprogs)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Mount points unmounted (innermost first) when dropped.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], source: &Path, target: &Path) {
        run(Command::new("mount").args(args).arg(source).arg(target));
        self.0.push(target.to_path_buf());
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(m) = self.0.pop() {
            let _ = Command::new("umount").arg(&m).status();
        }
    }
}

#[test]
fn dev_base_has_working_toolchains() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the image build test must run as root (debootstrap, chroot, mount)"
    );
    let root = cache_root();
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut opts = BuildOptions::new("dev-base", root.join("dev-images"), &root, shim_agent());
    let sink = events.clone();
    opts.progress = Arc::new(move |ev: &ProgressEvent<'_>| {
        let line = match ev {
            ProgressEvent::StepStarted { step } => format!("start {step}"),
            ProgressEvent::StepFinished { step, elapsed } => {
                format!("done {step} {:.1}s", elapsed.as_secs_f64())
            }
            ProgressEvent::CacheHit { id } => format!("cache hit {id}"),
            ProgressEvent::Message { .. } => return,
        };
        eprintln!("[image] {line}");
        sink.lock().unwrap().push(line);
    });

    let (img, took) = build(&opts, &events);
    eprintln!(
        "first build: {:.1}s ({})",
        took.as_secs_f64(),
        img.dir.display()
    );
    let (again, cached) = build(&opts, &events);
    eprintln!("second build: {:.2}s", cached.as_secs_f64());
    assert_eq!(again, img);
    let ev = events.lock().unwrap().clone();
    assert!(ev.iter().any(|e| e.starts_with("cache hit")), "{ev:?}");
    assert!(
        cached < Duration::from_secs(15),
        "cache hit took {cached:?}"
    );
    assert_eq!(img.manifest.name, "dev-base");
    assert!(
        img.manifest
            .initramfs_modules
            .iter()
            .any(|m| m == "virtio_blk")
    );

    // Without mounting: links, the profile script, pruned files.
    let rootfs = img.rootfs();
    for link in ["node", "npm", "npx", "bun", "opencode"] {
        let stat = debugfs(&rootfs, &format!("stat /usr/local/bin/{link}"));
        assert!(stat.contains("Type: symlink"), "{link}: {stat}");
    }
    let profile = debugfs(&rootfs, "cat /etc/profile.d/atelier.sh");
    assert!(
        profile.contains("OPENCODE_DISABLE_AUTOUPDATE=1"),
        "{profile}"
    );
    assert!(profile.contains("/opt/node22/bin"), "{profile}");
    let pkg = debugfs(&rootfs, "cat /root/.config/opencode/package.json");
    assert!(pkg.contains("@opencode-ai/plugin"), "{pkg}");
    let gone = debugfs(
        &rootfs,
        "stat /opt/opencode/node_modules/opencode-linux-x64-baseline",
    );
    assert!(gone.contains("not found"), "{gone}");

    // Read-only loop mount, then run the tools in a chroot.
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("root");
    std::fs::create_dir(&mnt).unwrap();
    let mut mounts = Mounts(Vec::new());
    mounts.mount(&["-o", "loop,ro,noload"], &rootfs, &mnt);
    // Bun-compiled binaries (bun, opencode) read /proc/self/exe.
    mounts.mount(&["-t", "proc"], Path::new("proc"), &mnt.join("proc"));
    mounts.mount(&["-t", "tmpfs"], Path::new("tmpfs"), &mnt.join("tmp"));
    let chroot = |script: &str| -> String {
        run(Command::new("chroot")
            .arg(&mnt)
            .args(["/bin/bash", "-lc", script])
            .env_clear()
            .env("HOME", "/tmp")
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("LC_ALL", "C"))
    };
    let checks = [
        ("node --version", "v22."),
        ("npm --version", "10."),
        ("node -e 'console.log(require(\"os\").arch())'", "x64"),
        ("bun --version", "1."),
        ("opencode --version", "1.18."),
        ("git --version", "git version"),
        ("python3 --version", "Python 3"),
        ("python3 -m venv --help | head -1", "usage"),
        ("gcc --version", "gcc"),
        ("rg --version", "ripgrep"),
        ("command -v claude || echo absent", "absent"),
    ];
    for (cmd, want) in checks {
        let t = Instant::now();
        let out = chroot(cmd);
        eprintln!(
            "[chroot] {cmd} -> {} ({:.1}s)",
            out.lines().next().unwrap_or(""),
            t.elapsed().as_secs_f64()
        );
        assert!(out.contains(want), "`{cmd}` printed {out:?}, want {want:?}");
    }
    // PATH from the profile script (login shell).
    let path = chroot("echo $PATH");
    assert!(path.contains("/opt/node22/bin"), "{path}");
}
