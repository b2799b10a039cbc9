//! Builds the `minimal` image for real (cached in `ATELIER_TEST_CACHE`, default
//! `/var/cache/atelier-test`) and boots it under QEMU with a tiny static shim agent
//! compiled from `tests/shim_agent.c`. Needs root, debootstrap, gcc and qemu-system-x86_64.
//! `ATELIER_TEST_ACCEL` overrides the accelerator (default `tcg,thread=multi`).

// Test helpers outside #[test] fns panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_image::{BuildOptions, Image, ProgressEvent, Step};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const MARKER: &str = "ATELIER-SHIM-AGENT";

fn cache_root() -> PathBuf {
    std::env::var_os("ATELIER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/atelier-test"))
}

/// Compiles the shim agent once per test binary run.
fn shim_agent() -> PathBuf {
    static SHIM: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut guard = SHIM.lock().unwrap();
    if let Some(p) = guard.as_ref() {
        return p.clone();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shim_agent.c");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("atelier-shim-agent");
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run gcc (apt-get install gcc libc6-dev)");
    assert!(status.success(), "gcc -static failed for {}", src.display());
    *guard = Some(out.clone());
    out
}

fn options(events: Arc<Mutex<Vec<String>>>) -> BuildOptions {
    assert!(
        rustix::process::geteuid().is_root(),
        "the image build test must run as root (debootstrap, chroot)"
    );
    let root = cache_root();
    let mut opts = BuildOptions::new("minimal", root.join("shim-images"), &root, shim_agent());
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
        events.lock().unwrap().push(line);
    });
    opts
}

/// Builds (or reuses) `minimal`, then checks a second build is a fast cache hit.
fn built_image() -> Image {
    static IMAGE: Mutex<Option<Image>> = Mutex::new(None);
    let mut guard = IMAGE.lock().unwrap();
    if let Some(img) = guard.as_ref() {
        return img.clone();
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let opts = options(events.clone());
    let t = Instant::now();
    let img = atelier_image::build(&opts).expect("build minimal");
    eprintln!(
        "first build: {:.1}s ({})",
        t.elapsed().as_secs_f64(),
        img.dir.display()
    );

    events.lock().unwrap().clear();
    let t = Instant::now();
    let again = atelier_image::build(&opts).expect("second build of minimal");
    let cached = t.elapsed();
    eprintln!("second build: {:.2}s", cached.as_secs_f64());
    assert_eq!(again, img, "second build must return the same image");
    let ev = events.lock().unwrap().clone();
    assert!(ev.iter().any(|e| e.starts_with("cache hit")), "{ev:?}");
    assert!(
        !ev.iter()
            .any(|e| e == &format!("start {}", Step::Debootstrap)),
        "{ev:?}"
    );
    assert!(
        cached < Duration::from_secs(15),
        "cache hit took {cached:?}"
    );

    let found = atelier_image::find(&opts.images_dir, "minimal")
        .unwrap()
        .expect("find minimal");
    assert_eq!(found.manifest.name, "minimal");
    assert!(
        atelier_image::list(&opts.images_dir)
            .unwrap()
            .iter()
            .any(|i| i.id() == img.id())
    );
    *guard = Some(img.clone());
    img
}

/// Kills and reaps QEMU when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(img: &Image, dir: &Path, with_disk: bool) -> Vm {
    let accel = std::env::var("ATELIER_TEST_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,rtc=on",
        "-accel",
        &accel,
        "-cpu",
        "max",
        "-smp",
        "2",
    ])
    .args([
        "-m",
        "512",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-no-reboot")
    .arg("-serial")
    .arg(format!("file:{}", dir.join("console.log").display()))
    .arg("-kernel")
    .arg(img.kernel())
    .arg("-initrd")
    .arg(img.initrd())
    .arg("-append")
    .arg(img.cmdline());
    if with_disk {
        c.arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,snapshot=on",
                img.rootfs().display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"]);
    }
    c.arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            dir.join("agent.sock").display()
        ))
        .args(["-device", "virtio-serial-device"])
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.atelier.agent.0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Vm(c.spawn().expect("start qemu-system-x86_64"))
}

/// Waits until the console log contains `needle` or QEMU exits; returns the log.
fn wait_console(vm: &mut Vm, dir: &Path, needle: &str) -> (String, Duration, bool) {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        if log.contains(needle) {
            return (log, start.elapsed(), true);
        }
        if let Ok(Some(_)) = vm.0.try_wait() {
            return (log, start.elapsed(), false);
        }
        if start.elapsed() > BOOT_TIMEOUT {
            return (log, start.elapsed(), false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn minimal_image_boots_to_the_agent() {
    let img = built_image();
    assert!(img.cmdline().contains("root=/dev/vda"));
    assert!(
        img.manifest
            .initramfs_modules
            .iter()
            .any(|m| m == "virtio_blk")
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = qemu(&img, tmp.path(), true);
    let (log, took, ok) = wait_console(&mut vm, tmp.path(), MARKER);
    assert!(
        ok,
        "no agent marker within {BOOT_TIMEOUT:?}; console:\n{log}"
    );
    eprintln!("boot to marker: {:.2}s", took.as_secs_f64());
    let line = log.lines().find(|l| l.contains(MARKER)).unwrap();
    for want in [
        "pid=1 ",
        "root=/dev/vda ",
        "fstype=ext4 ",
        "port_chardev=1 ",
        "name=org.atelier.agent.0",
    ] {
        assert!(line.contains(want), "`{want}` missing in: {line}");
    }
    assert!(!log.contains("Kernel panic"), "{log}");

    // The shim says hello on the virtio-serial port; read it through QEMU's socket.
    let mut sock = UnixStream::connect(tmp.path().join("agent.sock")).expect("connect agent.sock");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.read(&mut buf).expect("read hello from the guest");
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("hello from the shim agent"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[test]
fn missing_root_disk_gives_a_clear_error_and_powers_off() {
    let img = built_image();
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = qemu(&img, tmp.path(), false);
    let (log, _, ok) = wait_console(&mut vm, tmp.path(), "powering off");
    assert!(
        ok,
        "no initramfs error within {BOOT_TIMEOUT:?}; console:\n{log}"
    );
    assert!(
        log.contains("atelier-initramfs: error: root device /dev/vda did not appear"),
        "{log}"
    );
    // The guest powers off, so QEMU exits by itself.
    let start = Instant::now();
    while vm.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!log.contains("Kernel panic"), "{log}");
}

#[test]
fn unknown_recipe_is_a_typed_error() {
    let opts = BuildOptions::new("no-such-image", "/nonexistent", "/nonexistent", "/bin/true");
    let err = atelier_image::build(&opts).unwrap_err();
    assert!(matches!(
        err,
        atelier_image::ImageError::UnknownRecipe { .. }
    ));
    assert!(err.to_string().contains("minimal"), "{err}");
}
