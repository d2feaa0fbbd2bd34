//! Running an action's process (`sh -c <command>`, or a Flyte task's
//! command) in its own process group, stdin closed, its output forwarded
//! (or written to the attempt's log) and the tail of its stderr kept.
//!
//! The command runs in a process group of its own, so a Ctrl-C at the
//! executor's terminal reaches the executor (which drains) and not the
//! commands, and stopping a command reaches the processes it started.
//! Exits are noticed through SIGCHLD (with a slow poll as a fallback);
//! signals go to the whole group through the shell's `kill` builtin.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{ChildStderr, ChildStdout, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use super::log::{self, SharedLog};

/// How much of the end of a command's stderr is kept for its error.
pub(super) const STDERR_TAIL_BYTES: usize = 4096;

/// How often a running command is checked for exit when no SIGCHLD is
/// seen (signals coalesce; this also covers platforms without SIGCHLD).
const EXIT_POLL: Duration = Duration::from_secs(1);

/// The last bytes written to a stream, at most `capacity` of them.
#[derive(Debug)]
pub(super) struct StderrTail {
    bytes: VecDeque<u8>,
    capacity: usize,
    truncated: bool,
}

impl StderrTail {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity),
            capacity,
            truncated: false,
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        let keep = &chunk[chunk.len().saturating_sub(self.capacity)..];
        let overflow = (self.bytes.len() + keep.len()).saturating_sub(self.capacity);
        if overflow > 0 || keep.len() < chunk.len() {
            self.truncated = true;
        }
        self.bytes.drain(..overflow);
        self.bytes.extend(keep);
    }

    /// The kept bytes as text, trimmed. Invalid UTF-8 is replaced; when the
    /// start was cut off, a partial character at the cut is dropped.
    pub(super) fn text(&self) -> String {
        let (front, back) = self.bytes.as_slices();
        let bytes = [front, back].concat();
        let start = if self.truncated {
            bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count()
        } else {
            0
        };
        String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl Exit {
    pub(super) fn success(self) -> bool {
        self == Exit::Code(0)
    }

    fn from_status(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            return Exit::Code(code);
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return Exit::Signal(signal);
            }
        }
        Exit::Code(-1)
    }
}

/// A running command. Dropped while it still runs, it is killed.
pub(super) struct Command {
    /// `None` only once `Drop` took it.
    child: Option<std::process::Child>,
    #[cfg(unix)]
    sigchld: Option<tokio::signal::unix::Signal>,
    tail: Arc<Mutex<StderrTail>>,
    stderr_closed: Option<oneshot::Receiver<()>>,
}

/// What to run for one attempt.
#[derive(Clone)]
pub(super) struct Spec {
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    /// Added to the executor's own environment; a later entry wins.
    pub(super) env: Vec<(String, String)>,
    /// The working directory; the executor's when `None`.
    pub(super) cwd: Option<PathBuf>,
    /// Where stdout and stderr go. Without a log, stdout is inherited and
    /// stderr is forwarded to the executor's stderr.
    pub(super) log: Option<SharedLog>,
}

impl Spec {
    /// `sh -c <command>`, for the shell runner.
    pub(super) fn shell(command: &str, env: Vec<(String, String)>) -> Self {
        Self {
            program: PathBuf::from("sh"),
            args: vec!["-c".to_owned(), command.to_owned()],
            env,
            cwd: None,
            log: None,
        }
    }
}

impl Command {
    /// Starts `spec` in a process group of its own, stdin closed.
    pub(super) fn spawn(spec: Spec) -> io::Result<Self> {
        // Listen before the child exists, so its exit cannot be missed.
        #[cfg(unix)]
        let sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGCHLD; polling for exits");
                None
            }
        };
        let mut cmd = std::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(if spec.log.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::piped());
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn()?;
        let tail = Arc::new(Mutex::new(StderrTail::new(STDERR_TAIL_BYTES)));
        let (closed_tx, closed_rx) = oneshot::channel();
        if let Some(stderr) = child.stderr.take() {
            let reader_tail = tail.clone();
            let log = spec.log.clone();
            // A plain thread, not the blocking pool: a command's background
            // processes may hold stderr open for as long as they like, and
            // the runtime waits for its blocking pool when it shuts down.
            let reader = std::thread::Builder::new()
                .name("actionsd-stderr".to_owned())
                .stack_size(64 * 1024)
                .spawn(move || forward_stderr(stderr, log.as_ref(), &reader_tail, closed_tx));
            if let Err(err) = reader {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err);
            }
        }
        if let (Some(stdout), Some(log)) = (child.stdout.take(), spec.log) {
            let copier = std::thread::Builder::new()
                .name("actionsd-stdout".to_owned())
                .stack_size(64 * 1024)
                .spawn(move || copy_to_log(stdout, &log));
            if let Err(err) = copier {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err);
            }
        }
        Ok(Self {
            child: Some(child),
            #[cfg(unix)]
            sigchld,
            tail,
            stderr_closed: Some(closed_rx),
        })
    }

    /// The process id of the group leader.
    pub(super) fn id(&mut self) -> u32 {
        self.child().id()
    }

    fn child(&mut self) -> &mut std::process::Child {
        self.child
            .as_mut()
            .expect("the child is only taken by Drop")
    }

    /// Waits for the command to exit. Cancel-safe.
    pub(super) async fn wait(&mut self) -> io::Result<Exit> {
        loop {
            if let Some(status) = self.child().try_wait()? {
                return Ok(Exit::from_status(status));
            }
            self.exit_notice().await;
        }
    }

    /// Returns after a SIGCHLD or [`EXIT_POLL`], whichever comes first.
    async fn exit_notice(&mut self) {
        #[cfg(unix)]
        if let Some(sigchld) = self.sigchld.as_mut() {
            if let Ok(None) = tokio::time::timeout(EXIT_POLL, sigchld.recv()).await {
                self.sigchld = None;
            }
            return;
        }
        tokio::time::sleep(EXIT_POLL).await;
    }

    /// Stops the command: SIGTERM to its process group, then SIGKILL if it
    /// has not exited after `grace`.
    pub(super) async fn terminate(&mut self, grace: Duration) -> io::Result<Exit> {
        if let Some(status) = self.child().try_wait()? {
            return Ok(Exit::from_status(status));
        }
        self.signal_group("TERM").await;
        if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
            return exit;
        }
        tracing::warn!(grace = ?grace, "command still running after SIGTERM; killing it");
        self.signal_group("KILL").await;
        // The group signal needs the shell; the leader is killed directly too.
        let _ = self.child().kill();
        self.wait().await
    }

    /// Sends `signal` to the command's process group. Only while the
    /// leader is not reaped, so the group id cannot have been reused.
    async fn signal_group(&mut self, signal: &'static str) {
        #[cfg(unix)]
        {
            let group = self.child().id();
            let sent = tokio::task::spawn_blocking(move || kill_group(signal, group)).await;
            match sent {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => {
                    tracing::debug!(signal, %status, "kill found no process to signal");
                }
                Ok(Err(err)) => tracing::warn!(signal, error = %err, "cannot run kill"),
                Err(err) => tracing::warn!(signal, error = %err, "cannot run kill"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = signal;
            let _ = self.child().kill();
        }
    }

    /// The end of what the command wrote to stderr, once everything it
    /// wrote was read; waits at most `patience` for its stderr to close
    /// (a background process may hold it open).
    pub(super) async fn stderr_tail(&mut self, patience: Duration) -> String {
        if let Some(closed) = self.stderr_closed.take() {
            let _ = tokio::time::timeout(patience, closed).await;
        }
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .text()
    }
}

impl Drop for Command {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        // Still running: kill it and reap it off the runtime.
        let _ = std::thread::Builder::new()
            .name("actionsd-reaper".to_owned())
            .stack_size(64 * 1024)
            .spawn(move || {
                #[cfg(unix)]
                let _ = kill_group("KILL", child.id());
                let _ = child.kill();
                let _ = child.wait();
            });
    }
}

/// `kill -s <signal> -- -<group>` through the shell's builtin.
#[cfg(unix)]
fn kill_group(signal: &str, group: u32) -> io::Result<ExitStatus> {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"kill -s "$1" -- "-$2""#)
        .arg("sh")
        .arg(signal)
        .arg(group.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Copies the command's stderr to its log (or the executor's stderr) as it
/// comes and keeps its tail; signals `closed` at the end of the stream.
fn forward_stderr(
    mut stderr: ChildStderr,
    log: Option<&SharedLog>,
    tail: &Mutex<StderrTail>,
    closed: oneshot::Sender<()>,
) {
    let mut buf = [0u8; 8192];
    loop {
        match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                match log {
                    Some(log) => log::write(log, chunk),
                    None => {
                        let _ = io::stderr().write_all(chunk);
                    }
                }
                tail.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(chunk);
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = closed.send(());
}

/// Copies the command's stdout to its log until the stream ends.
fn copy_to_log(mut stdout: ChildStdout, log: &SharedLog) {
    let mut buf = [0u8; 8192];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => log::write(log, &buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_everything_below_capacity() {
        let mut tail = StderrTail::new(16);
        tail.push(b"hello ");
        tail.push(b"world\n");
        assert_eq!(tail.text(), "hello world");
    }

    #[test]
    fn the_tail_keeps_only_the_last_bytes() {
        let mut tail = StderrTail::new(8);
        tail.push(b"0123456");
        tail.push(b"789ab");
        assert_eq!(tail.text(), "456789ab");
        tail.push(b"a chunk longer than the capacity");
        assert_eq!(tail.text(), "capacity");
    }

    #[test]
    fn the_tail_drops_a_character_cut_in_half() {
        let mut tail = StderrTail::new(3);
        // "é" is two bytes; the cut falls between them.
        tail.push("xxé!!".as_bytes());
        assert_eq!(tail.text(), "!!");
        let mut whole = StderrTail::new(4);
        whole.push("é!!".as_bytes());
        assert_eq!(whole.text(), "é!!");
    }

    #[test]
    fn the_tail_replaces_invalid_utf8() {
        let mut tail = StderrTail::new(16);
        tail.push(b"bad \xff byte");
        assert_eq!(tail.text(), "bad \u{fffd} byte");
    }

    #[test]
    fn the_default_tail_is_four_kib() {
        let mut tail = StderrTail::new(STDERR_TAIL_BYTES);
        tail.push(&[b'a'; 10_000]);
        tail.push(b"end");
        let text = tail.text();
        assert_eq!(text.len(), 4096);
        assert!(text.ends_with("aend"));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_command_reports_its_exit_status_and_stderr() {
        let env = vec![("ACTIONSD_TEST_VALUE".to_owned(), "42".to_owned())];
        let mut cmd = Command::spawn(Spec::shell(
            r#"echo "value $ACTIONSD_TEST_VALUE" >&2; exit 3"#,
            env,
        ))
        .expect("sh runs");
        let exit = cmd.wait().await.expect("waits");
        assert_eq!(exit, Exit::Code(3));
        assert_eq!(cmd.stderr_tail(Duration::from_secs(5)).await, "value 42");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_successful_command_succeeds() {
        let mut cmd = Command::spawn(Spec::shell("true", vec![])).expect("sh runs");
        assert!(cmd.wait().await.expect("waits").success());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn terminate_stops_the_command_with_sigterm() {
        let mut cmd = Command::spawn(Spec::shell("sleep 30", vec![])).expect("sh runs");
        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            cmd.terminate(Duration::from_secs(5)),
        )
        .await
        .expect("stops in time")
        .expect("waits");
        assert_eq!(exit, Exit::Signal(15));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn terminate_kills_a_command_that_ignores_sigterm() {
        let mut cmd = Command::spawn(Spec::shell(
            "trap '' TERM; echo ready >&2; while :; do sleep 0.05; done",
            vec![],
        ))
        .expect("sh runs");
        // Let the shell install its trap first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            cmd.terminate(Duration::from_millis(300)),
        )
        .await
        .expect("stops in time")
        .expect("waits");
        assert_eq!(exit, Exit::Signal(9));
    }
}
