//! The guest console log: capped and rotated, read from its tail.
//!
//! QEMU appends the guest's serial console to `console.log` (`append=on`, so its file
//! descriptor has `O_APPEND`). A guest can print without end, so the manager calls
//! [`rotate_if_over`] periodically: once the log exceeds its cap, its content moves to
//! `console.log.1` (replacing the previous one) and `console.log` is truncated in
//! place; QEMU's next write lands at the new end of file. Disk use per sandbox thus
//! stays around twice the cap (plus what the guest writes between two checks). Lines
//! written between the copy and the truncation are lost, which is acceptable for a
//! diagnostic log.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Size at which the console log is rotated.
pub const CONSOLE_LOG_MAX: u64 = 8 << 20;

/// The rotated previous part of `log` (`console.log.1`).
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    log.with_file_name(name)
}

/// Rotates `log` when it is larger than `cap` bytes; true when it did. A missing log
/// is not an error.
pub fn rotate_if_over(log: &Path, cap: u64) -> io::Result<bool> {
    let mut file = match OpenOptions::new().read(true).write(true).open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len <= cap {
        return Ok(false);
    }
    // Keep the newest `cap` bytes in the rotated part.
    let rotated = rotated_path(log);
    let tmp = rotated.with_extension("1.tmp");
    {
        let mut out = File::create(&tmp)?;
        file.seek(SeekFrom::Start(len - cap))?;
        io::copy(&mut (&mut file).take(cap), &mut out)?;
    }
    std::fs::rename(&tmp, &rotated)?;
    file.set_len(0)?;
    Ok(true)
}

/// The last `max` bytes of the console log, reaching into the rotated part when the
/// current one is shorter.
pub fn read_tail(log: &Path, max: u64) -> io::Result<Vec<u8>> {
    let current = tail_of(log, max)?;
    let want = max.saturating_sub(current.len() as u64);
    if want == 0 {
        return Ok(current);
    }
    let mut out = tail_of(&rotated_path(log), want)?;
    out.extend(current);
    Ok(out)
}

fn tail_of(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotates_over_the_cap_and_appending_writer_continues() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        // An O_APPEND writer, like QEMU's file chardev with append=on.
        let mut w = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open");
        w.write_all(&[b'a'; 100]).expect("write");
        assert!(!rotate_if_over(&log, 100).expect("rotate"));
        w.write_all(b"bcdef").expect("write");
        assert!(rotate_if_over(&log, 100).expect("rotate"));
        assert_eq!(std::fs::metadata(&log).expect("meta").len(), 0);
        let old = std::fs::read(rotated_path(&log)).expect("rotated");
        assert_eq!(old.len(), 100);
        assert!(old.ends_with(b"bcdef"));
        w.write_all(b"new").expect("write");
        assert_eq!(std::fs::read(&log).expect("read"), b"new");
        let tail = read_tail(&log, 8).expect("tail");
        assert_eq!(tail, b"bcdefnew");
        assert_eq!(read_tail(&log, 2).expect("tail"), b"ew");
        assert!(!rotate_if_over(&dir.path().join("missing"), 1).expect("missing"));
    }
}
