//! Where a task process's output goes: one log per attempt, behind the
//! small [`AttemptLog`] interface so that another sink (shipping the lines
//! to actionsd, say) can be added beside the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Receives what an attempt's process writes, stdout and stderr
/// interleaved as they come.
pub(super) trait AttemptLog: Send {
    fn write_chunk(&mut self, chunk: &[u8]);
}

/// A log shared by the threads that copy stdout and stderr.
pub(super) type SharedLog = Arc<Mutex<dyn AttemptLog>>;

pub(super) fn write(log: &SharedLog, chunk: &[u8]) {
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .write_chunk(chunk);
}

/// A log file of bounded size: when it reaches `max_bytes` it is renamed
/// to `<name>.1` (replacing an older one) and a new file is started, so an
/// attempt keeps at most twice `max_bytes` on disk.
pub(super) struct RotatingFile {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    max_bytes: u64,
}

impl RotatingFile {
    /// Creates (or truncates) the log at `path`, and its directory.
    pub(super) fn create(path: &Path, max_bytes: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = File::create(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
            written: 0,
            max_bytes: max_bytes.max(1),
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        fs::rename(&self.path, rotated)?;
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)?,
        );
        self.written = 0;
        Ok(())
    }
}

impl AttemptLog for RotatingFile {
    fn write_chunk(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.written >= self.max_bytes {
                if let Err(err) = self.rotate() {
                    tracing::warn!(path = %self.path.display(), error = %err, "cannot rotate the task log");
                    return;
                }
            }
            let room = usize::try_from(self.max_bytes - self.written).unwrap_or(usize::MAX);
            let (now, later) = chunk.split_at(chunk.len().min(room));
            let Some(file) = self.file.as_mut() else {
                return;
            };
            if let Err(err) = file.write_all(now) {
                tracing::warn!(path = %self.path.display(), error = %err, "cannot write the task log");
                return;
            }
            self.written += now.len() as u64;
            chunk = later;
        }
    }
}

/// The log file, and the same output shipped to actionsd (see `ship`).
pub(super) struct Shipped {
    pub file: RotatingFile,
    pub shipper: super::ship::LogShipper,
}

impl AttemptLog for Shipped {
    fn write_chunk(&mut self, chunk: &[u8]) {
        self.file.write_chunk(chunk);
        if !self.shipper.write_chunk(chunk) {
            tracing::debug!(
                bytes = chunk.len(),
                "log shipping queue full; chunk not shipped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_at_its_bound_and_keeps_one_older_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/1.log");
        let mut log = RotatingFile::create(&path, 10).unwrap();
        log.write_chunk(b"0123456789abcdef");
        log.write_chunk(b"ghijklmnopqrstuvwxyz");
        let current = fs::read_to_string(&path).unwrap();
        let older = fs::read_to_string(dir.path().join("a/1.log.1")).unwrap();
        assert_eq!(older, "klmnopqrst");
        assert_eq!(current, "uvwxyz");
    }
}
