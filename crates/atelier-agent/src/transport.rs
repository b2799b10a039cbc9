//! The byte stream to the host: the virtio-serial port (or a unix socket in tests),
//! driven by two blocking threads so a blocked write never stalls reads.
//!
//! Guest virtio-serial semantics: while the host side is not connected, `read()`
//! returns 0 at once (we sleep and retry) and `write()` blocks.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use atelier_agent_proto::PORT_NAME;
use tokio::sync::mpsc;

type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

/// Where to find the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Search `/sys/class/virtio-ports` for [`PORT_NAME`].
    Discover,
    /// A given virtio-serial character device.
    Port(PathBuf),
    /// A unix socket to connect to (host-side tests; end of stream ends the agent).
    Unix(PathBuf),
}

/// What the reader thread delivers.
#[derive(Debug)]
pub enum Incoming {
    /// Bytes from the host.
    Data(Vec<u8>),
    /// The host disconnected; a partial frame must be dropped.
    HostGone,
    /// End of stream: stop serving.
    Eof,
}

/// The two halves of the connection.
pub struct Transport {
    /// Bytes from the host.
    pub incoming: mpsc::Receiver<Incoming>,
    /// Encoded frames to the host.
    pub outgoing: mpsc::Sender<Vec<u8>>,
    /// Whether we run inside a VM (port mode): shutdown and clock changes are real.
    pub in_vm: bool,
}

/// The `/dev` path of the virtio-serial port named `name`, from a sysfs class dir.
pub fn find_port(class_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class_dir).ok()?;
    entries.flatten().find_map(|entry| {
        let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// Opens the endpoint and starts the reader and writer threads.
pub fn open(endpoint: Endpoint) -> Result<Transport, String> {
    let (reader, writer, in_vm): (Box<dyn Read + Send>, Box<dyn Write + Send>, bool) =
        match endpoint {
            Endpoint::Unix(path) => {
                let stream = std::os::unix::net::UnixStream::connect(&path)
                    .map_err(|e| format!("connecting to {}: {e}", path.display()))?;
                let writer = stream
                    .try_clone()
                    .map_err(|e| format!("duplicating the socket {}: {e}", path.display()))?;
                (Box::new(stream), Box::new(writer), false)
            }
            Endpoint::Port(path) => {
                let (r, w) = open_port(&path)?;
                (r, w, true)
            }
            Endpoint::Discover => {
                let mut logged = false;
                let path = loop {
                    if let Some(p) = find_port(Path::new("/sys/class/virtio-ports"), PORT_NAME) {
                        break p;
                    }
                    if !logged {
                        log!("waiting for virtio-serial port {PORT_NAME}");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                };
                let (r, w) = open_port(&path)?;
                (r, w, true)
            }
        };
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, out_rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("port-reader".into())
        .spawn(move || read_loop(reader, in_tx, in_vm))
        .map_err(|e| format!("starting the reader thread: {e}"))?;
    std::thread::Builder::new()
        .name("port-writer".into())
        .spawn(move || write_loop(writer, out_rx))
        .map_err(|e| format!("starting the writer thread: {e}"))?;
    Ok(Transport {
        incoming: in_rx,
        outgoing: out_tx,
        in_vm,
    })
}

fn open_port(path: &Path) -> Result<Halves, String> {
    // A port can be opened only once: one read-write fd, duplicated for the writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let writer = file
        .try_clone()
        .map_err(|e| format!("duplicating {}: {e}", path.display()))?;
    Ok((Box::new(file), Box::new(writer)))
}

fn read_loop(mut reader: Box<dyn Read + Send>, tx: mpsc::Sender<Incoming>, port: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut host_connected = true;
    loop {
        let item = match reader.read(&mut buf) {
            Ok(0) if port => {
                // Host side not connected: poll until it is.
                if host_connected {
                    host_connected = false;
                    if tx.blocking_send(Incoming::HostGone).is_err() {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Ok(0) => Incoming::Eof,
            Ok(n) => {
                host_connected = true;
                Incoming::Data(buf[..n].to_vec())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if port => {
                log!("reading the port failed: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                log!("reading the socket failed: {e}");
                Incoming::Eof
            }
        };
        let eof = matches!(item, Incoming::Eof);
        if tx.blocking_send(item).is_err() || eof {
            return;
        }
    }
}

fn write_loop(mut writer: Box<dyn Write + Send>, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = rx.blocking_recv() {
        if let Err(e) = writer.write_all(&frame).and_then(|()| writer.flush()) {
            // The reader sees the end of the connection and stops the agent (unix mode);
            // on a port the host may come back, so keep going.
            log!("writing to the host failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (dev, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport0p2", PORT_NAME),
        ] {
            std::fs::create_dir(dir.path().join(dev)).expect("mkdir");
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(
            find_port(dir.path(), PORT_NAME),
            Some(PathBuf::from("/dev/vport0p2"))
        );
        assert_eq!(find_port(dir.path(), "other"), None);
        assert_eq!(find_port(&dir.path().join("missing"), PORT_NAME), None);
    }
}
