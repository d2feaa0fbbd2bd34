//! What a new user meets first, run with the real binaries: start-up
//! errors, logs in a file or a pipe, `--listen` with a host name, and
//! actionsctl's answers to a wrong `--server`, a daemon that never answers,
//! malformed input and `runs`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

conformance!(runs_show_the_queue_the_root_went_to);

const ACTIONSD: &str = env!("CARGO_BIN_EXE_actionsd");
const CTL: &str = env!("CARGO_BIN_EXE_actionsctl");

/// actionsd with no ACTIONSD_* settings from the environment, a data
/// directory of its own, and RUST_BACKTRACE=1 (which users often set).
fn actionsd(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(ACTIONSD);
    command
        .args(args)
        .env_remove("ACTIONSD_DATABASE_URL")
        .env_remove("ACTIONSD_CONFIG")
        .env_remove("ACTIONSD_LISTEN")
        .env_remove("ACTIONSD_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs actionsd to its end; returns (exit code, stdout, stderr).
async fn fails_to_start(home: &Path, args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(TIMEOUT, actionsd(home, args).output())
        .await
        .expect("actionsd gives up in time")
        .unwrap();
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Asserts a start-up error as printed: exit code 1, `error: …` starting
/// with `error`, then `hint: …` containing `hint`, and nothing else on
/// stderr (no repeated causes, no backtrace).
fn assert_startup_error(outcome: &(i32, String, String), error: &str, hint: &str) {
    let (code, _, stderr) = outcome;
    assert_eq!(*code, 1, "{outcome:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "two lines on stderr: {stderr}");
    assert!(
        lines[0].starts_with(&format!("error: {error}")),
        "{:?} does not start with {error:?}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("hint: ") && lines[1].contains(hint),
        "{:?} is not a hint containing {hint:?}",
        lines[1]
    );
    assert!(!stderr.contains("Caused by") && !stderr.contains("backtrace"));
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn start_up_errors_are_two_lines_that_say_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    // A typo in the config file: one line with the position, not a snippet.
    let config = home.join("actionsd.toml");
    std::fs::write(&config, "lissten = \"127.0.0.1:1\"\n").unwrap();
    let outcome = fails_to_start(home, &["serve", "--config", config.to_str().unwrap()]).await;
    assert_startup_error(
        &outcome,
        &format!(
            "invalid config file {}: line 1, column 1: unknown field `lissten`",
            config.display()
        ),
        "config/actionsd.toml lists every setting",
    );

    // A mistyped SQLite path: nothing is created.
    let typo = home.join("no-such-dir").join("actionsd.db");
    let url = format!("sqlite://{}", typo.display());
    let outcome = fails_to_start(home, &["serve", "--database-url", &url]).await;
    assert_startup_error(
        &outcome,
        &format!(
            "cannot open the SQLite store {}: the directory {} does not exist",
            typo.display(),
            home.join("no-such-dir").display()
        ),
        "create the directory",
    );
    assert!(!home.join("no-such-dir").exists());

    // Nothing listens where the database should be.
    let url = format!("postgres://postgres@127.0.0.1:{}/actionsd", free_port());
    let outcome = fails_to_start(home, &["serve", "--database-url", &url]).await;
    assert_startup_error(
        &outcome,
        "cannot reach the database: ",
        "check that Postgres is running",
    );
    assert!(outcome.2.contains("Connection refused"), "{outcome:?}");

    // The address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let url = format!("sqlite://{}", home.join("a.db").display());
    let outcome = fails_to_start(
        home,
        &["serve", "--listen", &address, "--database-url", &url],
    )
    .await;
    assert_startup_error(
        &outcome,
        &format!("cannot listen on {address}: "),
        "choose another address with --listen",
    );
}

/// The `--database-url` of `pool`'s server with another role or database.
#[cfg(actionsd_postgres)]
fn postgres_url(pool: &sqlx::PgPool, user: &str, database: &str) -> String {
    use sqlx::ConnectOptions;
    pool.connect_options()
        .as_ref()
        .clone()
        .username(user)
        .database(database)
        .to_url_lossy()
        .to_string()
}

#[sqlx::test(migrations = false)]
#[cfg_attr(
    not(actionsd_postgres),
    ignore = "the Postgres suite needs DATABASE_URL"
)]
async fn postgres_start_up_errors_name_the_real_cause(pool: sqlx::PgPool) {
    #[cfg(actionsd_postgres)]
    {
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        let user = pool.connect_options().get_username().to_owned();
        let database = pool.connect_options().get_database().unwrap().to_owned();

        // A login the server refuses is not "cannot reach the database".
        let url = postgres_url(&pool, "no_such_role_actionsd", &database);
        let outcome = fails_to_start(home, &["serve", "--database-url", &url]).await;
        assert_startup_error(
            &outcome,
            "the database refused the login: role \"no_such_role_actionsd\" does not exist",
            "check the user name and password",
        );

        // migrate_on_start = false on an unmigrated database.
        let config = home.join("actionsd.toml");
        std::fs::write(&config, "[database]\nmigrate_on_start = false\n").unwrap();
        let url = postgres_url(&pool, &user, &database);
        let args = [
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--database-url",
        ];
        let outcome = fails_to_start(home, &[&args[..], &[url.as_str()]].concat()).await;
        assert_startup_error(
            &outcome,
            "the database lacks migrations [",
            "run `actionsd migrate`",
        );

        // … and on a database that does not exist.
        // (A fresh short name: Postgres truncates names to 63 bytes.)
        let missing = format!("actionsd_missing_{}", std::process::id());
        let url = postgres_url(&pool, &user, &missing);
        let outcome = fails_to_start(home, &[&args[..], &[url.as_str()]].concat()).await;
        assert_startup_error(
            &outcome,
            "the database does not exist: ",
            "run `actionsd migrate`",
        );

        // `actionsd migrate` then lets the same daemon start.
        let url = postgres_url(&pool, &user, &database);
        let output = actionsd(home, &["migrate", "--database-url", &url])
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let mut daemon = spawn_daemon(
            home,
            &["--config", config.to_str().unwrap(), "--database-url", &url],
        )
        .await;
        daemon.stop().await;
    }
    #[cfg(not(actionsd_postgres))]
    drop(pool);
}

/// A daemon started with `args` after `serve --listen LISTEN`, its output
/// read until it listens.
struct Spawned {
    child: tokio::process::Child,
    reader: BufReader<tokio::process::ChildStdout>,
    /// stdout up to and including the "listening" line.
    stdout: Vec<u8>,
    address: String,
}

async fn spawn_daemon(home: &Path, args: &[&str]) -> Spawned {
    spawn_daemon_on(home, "127.0.0.1:0", args).await
}

async fn spawn_daemon_on(home: &Path, listen: &str, args: &[&str]) -> Spawned {
    let mut command = actionsd(home, &["serve", "--listen", listen]);
    command.args(args);
    let mut child = command.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut stdout = Vec::new();
    let read = async {
        loop {
            let start = stdout.len();
            if reader.read_until(b'\n', &mut stdout).await.unwrap() == 0 {
                let mut stderr = String::new();
                let _ = child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .await;
                panic!(
                    "the daemon exited without listening: {}{stderr}",
                    String::from_utf8_lossy(&stdout)
                );
            }
            let line = String::from_utf8_lossy(&stdout[start..]).into_owned();
            if let Some((_, rest)) = line.split_once("actionsd listening") {
                let address = rest
                    .split_once("address")
                    .map(|(_, a)| a.trim_start_matches(['=', '"', ':']).to_owned())
                    .unwrap_or_default();
                return address
                    .split(|c: char| c == '"' || c.is_whitespace() || c == '\u{1b}')
                    .next()
                    .unwrap()
                    .to_owned();
            }
        }
    };
    let address = tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("the daemon listens in time");
    Spawned {
        child,
        reader,
        stdout,
        address,
    }
}

impl Spawned {
    /// SIGTERM, then the rest of stdout and stderr; asserts exit 0.
    async fn stop(&mut self) -> (Vec<u8>, Vec<u8>) {
        let pid = libc::pid_t::try_from(self.child.id().unwrap()).unwrap();
        // SAFETY: kill only sends a signal, to our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let mut out = std::mem::take(&mut self.stdout);
        let mut err = Vec::new();
        let mut stderr = self.child.stderr.take().unwrap();
        let status = tokio::time::timeout(TIMEOUT, async {
            let (a, b) = tokio::join!(
                self.reader.read_to_end(&mut out),
                stderr.read_to_end(&mut err)
            );
            a.unwrap();
            b.unwrap();
            self.child.wait().await.unwrap()
        })
        .await
        .expect("the daemon stops in time");
        assert!(
            status.success(),
            "{status:?}: {}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        (out, err)
    }
}

#[tokio::test]
async fn logs_in_a_pipe_have_no_colour_codes_and_sqlite_ignores_migrate_on_start() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let config = home.join("actionsd.toml");
    std::fs::write(&config, "[database]\nmigrate_on_start = false\n").unwrap();
    let url = format!("sqlite://{}", home.join("actionsd.db").display());
    let mut daemon = spawn_daemon(
        home,
        &["--config", config.to_str().unwrap(), "--database-url", &url],
    )
    .await;
    let (stdout, stderr) = daemon.stop().await;
    let text = String::from_utf8_lossy(&stdout);
    assert!(text.contains("actionsd listening"), "{text}");
    assert!(text.contains("shut down"), "{text}");
    assert!(
        !stdout.contains(&0x1b) && !stderr.contains(&0x1b),
        "colour codes in piped logs: {text}"
    );
    assert!(
        text.contains("WARN") && text.contains("migrate_on_start = false is ignored on SQLite"),
        "{text}"
    );
}

#[tokio::test]
async fn listen_accepts_a_host_name() {
    let home = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", home.path().join("actionsd.db").display());
    let mut daemon = spawn_daemon_on(home.path(), "localhost:0", &["--database-url", &url]).await;
    assert!(
        daemon.address.starts_with("127.0.0.1:"),
        "localhost is listened on as {:?}",
        daemon.address
    );
    let output = Command::new(CTL)
        .args(["--server", &daemon.address, "health"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    daemon.stop().await;

    // A name that is not HOST:PORT is a usage error naming the flag.
    let output = actionsd(home.path(), &["serve", "--listen", "localhost"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("'--listen <LISTEN>'") && stderr.contains("HOST:PORT"),
        "{stderr}"
    );
}

/// actionsctl, with `stdin` as its standard input.
async fn actionsctl(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(CTL)
        .args(args)
        .env_remove("ACTIONSD_SERVER")
        .env_remove("ACTIONSD_OUTPUT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin)
        .await
        .unwrap();
    drop(input);
    let output = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .expect("actionsctl ends in time")
        .unwrap();
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn actionsctl_refuses_other_schemes_and_reports_malformed_json_as_json() {
    let (code, _, stderr) = actionsctl(&["--server", "ftp://x", "runs"], b"").await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: --server \"ftp://x\" is not a valid URL: the scheme must be http or https"
    );

    // Read before connecting: no daemon is needed.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, _, stderr) = actionsctl(
        &["--server", &nowhere, "enqueue", "-f", "-"],
        b"{\"action\": {\"inputUri\": }\n",
    )
    .await;
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT: -: invalid JSON: "),
        "{stderr}"
    );
}

/// A server that accepts connections and never answers: TCP and the
/// HTTP/2 preface get through, no response ever comes.
fn silent_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        // Holds what it accepted until the test is over (bounded in time).
        let mut held = Vec::new();
        let until = Instant::now() + TIMEOUT;
        while Instant::now() < until && held.len() < 64 {
            match listener.accept() {
                Ok((socket, _)) => held.push(socket),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (format!("http://{address}"), handle)
}

#[tokio::test]
async fn actionsctl_timeouts_exit_6_and_say_which_timeout_expired() {
    let (server, _held) = silent_server();

    let started = Instant::now();
    let (code, stdout, stderr) =
        actionsctl(&["--server", &server, "--timeout", "2s", "runs"], b"").await;
    assert_eq!(code, 6, "{stderr}");
    assert!(stdout.is_empty());
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: DEADLINE_EXCEEDED: {server} did not answer within --timeout 2s \
             (connected; the call timed out)"
        )
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let started = Instant::now();
    let (code, _, stderr) = actionsctl(&["--server", &server, "health", "--wait", "3s"], b"").await;
    assert_eq!(code, 6, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: DEADLINE_EXCEEDED: {server} did not report SERVING within --wait 3s; \
             last try: no answer in time"
        )
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

async fn runs_show_the_queue_the_root_went_to(db: TestDb) {
    let daemon = Daemon::start(&db).await;
    let server = format!("http://{}", daemon.addr);
    let ctl = |args: &'static [&'static str]| {
        let server = server.clone();
        async move {
            let mut full = vec!["--server", &server];
            full.extend_from_slice(args);
            actionsctl(&full, b"").await
        }
    };
    let (code, _, stderr) = ctl(&["enqueue", "release", "main", "--queue", "manual"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = ctl(&["enqueue", "other", "main"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = ctl(&["enqueue", "spec", "main", "--run-queue", "gpu"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = ctl(&["runs", "-o", "json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let runs: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let queue_of = |name: &str| {
        runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"]["name"] == name)
            .unwrap_or_else(|| panic!("no run {name} in {runs}"))["queue"]
            .clone()
    };
    assert_eq!(queue_of("release"), "manual");
    assert_eq!(queue_of("other"), "default");
    assert_eq!(queue_of("spec"), "gpu");
    let (code, table, _) = ctl(&["runs"]).await;
    assert_eq!(code, 0);
    let release = table.lines().find(|l| l.starts_with("release ")).unwrap();
    assert!(release.contains(" manual "), "{table}");
    daemon.stop().await;
}

#[tokio::test]
async fn help_names_both_stores() {
    let home = tempfile::tempdir().unwrap();
    let help = |args: &'static [&'static str]| {
        let home = home.path().to_owned();
        async move {
            let output = actionsd(&home, args).output().await.unwrap();
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let top = help(&["--help"]).await;
    assert!(
        top.contains("embedded SQLite file (the default) or Postgres"),
        "{top}"
    );
    let serve = help(&["serve", "--help"]).await;
    assert!(
        serve.contains("sqlite://PATH") && serve.contains("postgres://"),
        "{serve}"
    );
    assert!(serve.contains("[default: sqlite"), "{serve}");
    assert!(!serve.contains("Postgres URL"), "{serve}");
}

/// A listener whose accept queue is full: connecting to it hangs (Linux
/// drops the SYN), so only a connect timeout ends the wait. Returns the
/// URL and what must be kept open meanwhile.
#[cfg(target_os = "linux")]
fn full_listener() -> (String, Vec<std::net::TcpStream>, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls on a socket this function owns; every
    // result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, std::ptr::addr_of!(addr).cast(), len), 0);
        // Backlog 0: one connection fills the accept queue.
        assert_eq!(libc::listen(fd, 0), 0);
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut bound_len = len;
        assert_eq!(
            libc::getsockname(fd, std::ptr::addr_of_mut!(bound).cast(), &mut bound_len),
            0
        );
        let address = std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            u16::from_be(bound.sin_port),
        ));
        // Fill the queue until a connect no longer completes (bounded).
        let mut held = Vec::new();
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
                Ok(stream) => held.push(stream),
                Err(_) => return (format!("http://{address}"), held, owned),
            }
        }
        panic!("the accept queue of {address} never filled");
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn actionsctl_says_when_the_connect_timeout_expired() {
    let (server, _held, _listener) = full_listener();
    let started = Instant::now();
    let (code, _, stderr) =
        actionsctl(&["--server", &server, "--timeout", "1s", "runs"], b"").await;
    assert_eq!(code, 6, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: DEADLINE_EXCEEDED: cannot connect to {server}: no connection within --timeout 1s"
        )
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
