//! TLS on the listener: gRPC, gRPC-Web, Connect, blob URLs and /metrics
//! over TLS; plain HTTP refused on the TLS port; client certificates
//! (mTLS); certificates reloaded without a restart; the non-loopback rule;
//! actionsctl over https. Certificates are made at test time with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actionsd::client::ClientSecurity;
use actionsd::proto::actionsd::read::v1::read_service_client::ReadServiceClient;
use actionsd::proto::actionsd::read::v1::ListRunsRequest;
use actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use actionsd::tls::{ClientAuth, TlsSettings};
use common::{task, Daemon, TestDb, TIMEOUT};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::Endpoint;

const ACTIONSD: &str = env!("CARGO_BIN_EXE_actionsd");
const CTL: &str = env!("CARGO_BIN_EXE_actionsctl");

/// A test CA and the files of certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "actionsd test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Writes `<name>.pem` and `<name>.key` (each replaced atomically) and
    /// returns the certificate's DER.
    fn issue(&self, name: &str, serial: u64, client: bool) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} {serial}"));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        replace(&self.path(&format!("{name}.key")), &key.serialize_pem());
        replace(&self.path(&format!("{name}.pem")), &cert.pem());
        cert.der().to_vec()
    }

    fn settings(&self, client_ca: Option<ClientAuth>) -> TlsSettings {
        TlsSettings {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: client_ca.map(|_| self.ca()),
            client_auth: client_ca.unwrap_or(ClientAuth::Required),
            handshake_timeout: Duration::from_secs(5),
            reload_interval: Duration::from_millis(200),
        }
    }

    fn client(&self, with_cert: bool) -> ClientSecurity {
        ClientSecurity {
            ca_cert: Some(self.ca()),
            client_cert: with_cert.then(|| self.path("client.pem")),
            client_key: with_cert.then(|| self.path("client.key")),
            ..ClientSecurity::default()
        }
    }

    fn http(&self, with_cert: bool) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca()).unwrap()).unwrap();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(TIMEOUT);
        if with_cert {
            let mut pem = std::fs::read(self.path("client.pem")).unwrap();
            pem.extend(std::fs::read(self.path("client.key")).unwrap());
            builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        builder
    }
}

/// Replaces `path` by rename, so that a reader never sees half a file.
fn replace(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

async fn tls_daemon(db: &TestDb, pki: &Pki, client_auth: Option<ClientAuth>) -> Daemon {
    let settings = pki.settings(client_auth);
    Daemon::start_with(db, move |config| config.tls = Some(settings)).await
}

fn https(daemon: &Daemon, path: &str) -> String {
    format!("https://localhost:{}{path}", daemon.addr.port())
}

async fn channel(
    daemon: &Daemon,
    security: &ClientSecurity,
) -> Result<actionsd::client::AuthChannel, tonic::transport::Error> {
    let url = https(daemon, "");
    let endpoint = Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_timeout(TIMEOUT);
    let endpoint = security.apply(endpoint, &url).unwrap();
    let channel = tokio::time::timeout(TIMEOUT, endpoint.connect())
        .await
        .expect("connect within the timeout")?;
    Ok(security.wrap(channel).unwrap())
}

/// The certificate the daemon presents to a new connection.
async fn presented_certificate(addr: std::net::SocketAddr, pki: &Pki) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio::time::timeout(
        TIMEOUT,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// gRPC (HTTP/2), gRPC-Web and Connect (HTTP/2 and HTTP/1.1), a blob URL
/// and /metrics, all on the TLS port; ALPN offers h2 and http/1.1.
#[tokio::test]
async fn every_protocol_is_served_over_tls() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, None).await;

    // gRPC with tonic.
    let mut actions =
        ActionsServiceClient::new(channel(&daemon, &pki.client(false)).await.unwrap());
    actions.enqueue(task("tls1", "a0", None)).await.unwrap();

    for http1 in [false, true] {
        let mut builder = pki.http(false);
        if http1 {
            builder = builder.http1_only();
        }
        let http = builder.build().unwrap();
        let expected = if http1 {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };

        // Connect, JSON.
        let response = http
            .post(https(&daemon, "/actionsd.read.v1.ReadService/ListRuns"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), expected);
        let body = response.text().await.unwrap();
        assert!(body.contains("tls1"), "{body}");

        // gRPC-Web: the status in the trailer frame.
        let message = ListRunsRequest::default().encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&message);
        let response = http
            .post(https(&daemon, "/actionsd.read.v1.ReadService/ListRuns"))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(frame)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), expected);
        let body = response.bytes().await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("grpc-status:0"), "{text}");
        assert!(text.contains("tls1"), "{text}");

        // /metrics on the same port.
        let response = http.get(https(&daemon, "/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains("actionsd_"), "{text}");

        // A blob URL reaches the blob handler, which refuses an unsigned
        // request itself (a 4xx of its own, not a gRPC error).
        let response = http
            .get(https(&daemon, "/blobs/v1/download?key=x"))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{response:?}");
        assert!(
            response.headers().get("grpc-status").is_none(),
            "{response:?}"
        );
    }
    daemon.stop().await;
}

/// A plain HTTP client gets no answer from the TLS port: the handshake
/// fails and the connection is closed.
#[tokio::test]
async fn plain_http_fails_on_the_tls_port() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, None).await;

    let plain = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let result = plain
        .post(format!(
            "http://{}/actionsd.read.v1.ReadService/ListRuns",
            daemon.addr
        ))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await;
    assert!(result.is_err(), "{result:?}");

    let grpc = tokio::time::timeout(
        TIMEOUT,
        Endpoint::from_shared(format!("http://{}", daemon.addr))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    if let Ok(channel) = grpc {
        let result = ReadServiceClient::new(channel)
            .list_runs(ListRunsRequest::default())
            .await;
        assert!(result.is_err(), "{result:?}");
    }
    // The daemon still serves TLS clients.
    let mut read = ReadServiceClient::new(channel(&daemon, &pki.client(false)).await.unwrap());
    read.list_runs(ListRunsRequest::default()).await.unwrap();
    daemon.stop().await;
}

/// With `client_auth = "required"`, a client without a certificate signed
/// by the client CA is refused; one with it is served.
#[tokio::test]
async fn client_certificates_are_required_when_configured() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    pki.issue("client", 2, true);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, Some(ClientAuth::Required)).await;

    // Without a certificate: refused (TLS 1.3 reports it at the first read,
    // so the connection may open and the call fail).
    let without = match channel(&daemon, &pki.client(false)).await {
        Ok(channel) => ReadServiceClient::new(channel)
            .list_runs(ListRunsRequest::default())
            .await
            .map(|_| ())
            .map_err(|status| status.to_string()),
        Err(err) => Err(err.to_string()),
    };
    assert!(
        without.is_err(),
        "a client without a certificate was served"
    );
    let result = pki
        .http(false)
        .build()
        .unwrap()
        .post(https(&daemon, "/actionsd.read.v1.ReadService/ListRuns"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await;
    assert!(result.is_err(), "{result:?}");

    // A certificate from another CA: refused too.
    let other = Pki::new();
    other.issue("client", 3, true);
    let mut foreign = other.client(true);
    foreign.ca_cert = Some(pki.ca());
    let result = match channel(&daemon, &foreign).await {
        Ok(channel) => ReadServiceClient::new(channel)
            .list_runs(ListRunsRequest::default())
            .await
            .map(|_| ())
            .map_err(|status| status.to_string()),
        Err(err) => Err(err.to_string()),
    };
    assert!(result.is_err(), "a certificate of another CA was accepted");

    // With the certificate: served, on gRPC and Connect.
    let mut read = ReadServiceClient::new(channel(&daemon, &pki.client(true)).await.unwrap());
    read.list_runs(ListRunsRequest::default()).await.unwrap();
    let response = pki
        .http(true)
        .build()
        .unwrap()
        .post(https(&daemon, "/actionsd.read.v1.ReadService/ListRuns"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    daemon.stop().await;
}

/// With `client_auth = "optional"`, a client may come without a
/// certificate.
#[tokio::test]
async fn client_certificates_may_be_optional() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    pki.issue("client", 2, true);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, Some(ClientAuth::Optional)).await;
    for with_cert in [false, true] {
        let mut read =
            ReadServiceClient::new(channel(&daemon, &pki.client(with_cert)).await.unwrap());
        read.list_runs(ListRunsRequest::default()).await.unwrap();
    }
    daemon.stop().await;
}

/// Replaced certificate files are picked up by new connections without a
/// restart; a bad replacement keeps the previous certificate in use.
#[tokio::test]
async fn certificates_reload_and_a_bad_file_keeps_the_old_one() {
    let pki = Pki::new();
    let first = pki.issue("server", 1, false);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, None).await;
    assert_eq!(presented_certificate(daemon.addr, &pki).await, first);
    let mut read = ReadServiceClient::new(channel(&daemon, &pki.client(false)).await.unwrap());
    read.list_runs(ListRunsRequest::default()).await.unwrap();

    // A new certificate and key (serial 2): seen within a few reload
    // intervals (200 ms here), by new connections.
    let second = pki.issue("server", 2, false);
    assert_ne!(first, second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if presented_certificate(daemon.addr, &pki).await == second {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not picked up within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the reload still works.
    read.list_runs(ListRunsRequest::default()).await.unwrap();

    // A broken certificate file: the second certificate stays in use.
    replace(
        &pki.path("server.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(presented_certificate(daemon.addr, &pki).await, second);
    // A key that does not match the certificate: still the second.
    let third_key = KeyPair::generate().unwrap();
    let _ = pki.issue("server", 3, false);
    replace(&pki.path("server.key"), &third_key.serialize_pem());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(presented_certificate(daemon.addr, &pki).await, second);
    let mut read = ReadServiceClient::new(channel(&daemon, &pki.client(false)).await.unwrap());
    read.list_runs(ListRunsRequest::default()).await.unwrap();

    // Fixed files are picked up again.
    let fourth = pki.issue("server", 4, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while presented_certificate(daemon.addr, &pki).await != fourth {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fixed files not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
}

/// `actionsd serve` output of a start that fails before listening.
async fn serve(args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(ACTIONSD);
    command
        .arg("serve")
        .args(args)
        .env_remove("ACTIONSD_CONFIG")
        .env_remove("ACTIONSD_LISTEN")
        .env_remove("ACTIONSD_DANGEROUSLY_ALLOW_INSECURE_PUBLIC_LISTENER")
        .kill_on_drop(true);
    tokio::time::timeout(TIMEOUT, command.output())
        .await
        .expect("actionsd exits in time")
        .unwrap()
}

/// A non-loopback listen address needs TLS and authentication, or the
/// loud flag. The checks run before anything binds: the accepted case is
/// shown by the start going on to the store (a missing directory here),
/// so the test never listens beyond loopback.
#[tokio::test]
async fn a_public_listener_is_refused_without_the_flag() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/missing/actionsd.db", dir.path().display());

    let out = serve(&["--listen", "0.0.0.0:0", "--database-url", &store]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(
            "error: refusing to listen on 0.0.0.0:0 (listen) without TLS and authentication"
        ),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("hint: ")
            && lines[1].contains("--dangerously-allow-insecure-public-listener"),
        "{stderr}"
    );

    // TLS without authentication is not enough.
    let cert = pki.path("server.pem");
    let key = pki.path("server.key");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let out = serve(&[
        "--listen",
        "0.0.0.0:0",
        "--database-url",
        &store,
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .starts_with("error: refusing to listen on 0.0.0.0:0 (listen) without authentication"),
        "{stderr}"
    );

    // With the flag (or its variable) the listener check passes; the start
    // fails later, at the store.
    for flag in [true, false] {
        let mut command = tokio::process::Command::new(ACTIONSD);
        command
            .args(["serve", "--listen", "0.0.0.0:0", "--database-url", &store])
            .env_remove("ACTIONSD_CONFIG")
            .kill_on_drop(true);
        if flag {
            command.arg("--dangerously-allow-insecure-public-listener");
        } else {
            command.env(
                "ACTIONSD_DANGEROUSLY_ALLOW_INSECURE_PUBLIC_LISTENER",
                "true",
            );
        }
        let out = tokio::time::timeout(TIMEOUT, command.output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("refusing"), "{stderr}");
        assert!(stderr.contains("missing"), "{stderr}");
    }

    // Loopback needs nothing.
    let out = serve(&["--listen", "127.0.0.1:0", "--database-url", &store]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("refusing"), "{stderr}");

    // A bad certificate file fails the start with its own error and hint.
    let out = serve(&[
        "--database-url",
        &store,
        "--tls-cert",
        key,
        "--tls-key",
        key,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: invalid certificate"), "{stderr}");
    assert!(stderr.contains("\nhint: "), "{stderr}");
}

/// actionsctl reaches a TLS daemon with --ca-cert and an https:// URL,
/// with a client certificate when the daemon asks for one.
#[tokio::test]
async fn actionsctl_connects_over_https() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    pki.issue("client", 2, true);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, Some(ClientAuth::Required)).await;
    let mut actions = ActionsServiceClient::new(channel(&daemon, &pki.client(true)).await.unwrap());
    actions.enqueue(task("ctl1", "a0", None)).await.unwrap();

    let ctl = |args: Vec<String>| async move {
        let mut command = tokio::process::Command::new(CTL);
        command
            .args(args)
            .env_remove("ACTIONSD_SERVER")
            .env_remove("ACTIONSD_TOKEN")
            .env_remove("ACTIONSD_PROJECT")
            .env_remove("ACTIONSD_DOMAIN")
            .kill_on_drop(true);
        tokio::time::timeout(TIMEOUT, command.output())
            .await
            .unwrap()
            .unwrap()
    };
    let server = https(&daemon, "");
    let ca = pki.ca().display().to_string();
    let cert = pki.path("client.pem").display().to_string();
    let key = pki.path("client.key").display().to_string();
    let args = |extra: &[&str]| {
        let mut args: Vec<String> = ["--server", &server, "--ca-cert", &ca, "--timeout", "5s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let out = ctl(args(&[
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "health",
    ]))
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = ctl(args(&[
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "--token",
        "not-printed-anywhere",
        "runs",
        "-o",
        "json",
    ]))
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ctl1"), "{stdout}");
    assert!(!format!("{out:?}").contains("not-printed-anywhere"));

    // Without the client certificate the daemon refuses the connection.
    let out = ctl(args(&["health"])).await;
    assert!(!out.status.success(), "{out:?}");
    // Certificate options with an http:// URL are a usage error.
    let out = ctl(vec![
        "--server".into(),
        format!("http://{}", daemon.addr),
        "--ca-cert".into(),
        ca.clone(),
        "health".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("https://"),
        "{out:?}"
    );
    daemon.stop().await;
}

/// `actionsd executor` leases and finishes a task from a daemon that
/// requires client certificates, with --ca-cert, --client-cert,
/// --client-key and a token that it never prints.
#[tokio::test]
async fn the_executor_connects_over_https_with_a_client_certificate() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    pki.issue("client", 2, true);
    let db = TestDb::sqlite();
    let daemon = tls_daemon(&db, &pki, Some(ClientAuth::Required)).await;
    let security = pki.client(true);
    let url = https(&daemon, "");
    let endpoint = security
        .apply(Endpoint::from_shared(url.clone()).unwrap(), &url)
        .unwrap();
    let mut client = ActionsServiceClient::new(endpoint.connect().await.unwrap());

    let executor = tokio::process::Command::new(ACTIONSD)
        .args(["executor", "--server", &url, "--queue", "default"])
        .arg("--ca-cert")
        .arg(pki.ca())
        .arg("--client-cert")
        .arg(pki.path("client.pem"))
        .arg("--client-key")
        .arg(pki.path("client.key"))
        .args(["--heartbeat-interval", "200ms", "--exec", "exit 0"])
        .env("ACTIONSD_TOKEN", "executor-secret-token")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The root waits on a queue nobody serves; its child runs here.
    let mut root = task("x1", "a0", None);
    if let Some(actionsd::proto::flyteidl2::actions::action::Spec::Task(t)) =
        root.action.as_mut().unwrap().spec.as_mut()
    {
        t.queue = "parents".into();
    }
    client.enqueue(root).await.unwrap();
    let mut watcher = common::Watcher::open(&mut client, "x1", "a0").await;
    client.enqueue(task("x1", "ok", Some("a0"))).await.unwrap();
    watcher.until_phase("ok", common::SUCCEEDED).await;

    // SIGTERM: the executor drains and exits 0.
    let pid = i32::try_from(executor.id().unwrap()).unwrap();
    // SAFETY: signals the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = tokio::time::timeout(TIMEOUT, executor.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!logs.is_empty());
    assert!(!logs.contains("executor-secret-token"), "{logs}");
    daemon.stop().await;
}

/// The `/metrics` admin listener (`metrics.listen`) uses the same TLS.
#[tokio::test]
async fn the_metrics_listener_is_served_over_tls_too() {
    let pki = Pki::new();
    pki.issue("server", 1, false);
    let db = TestDb::sqlite();
    let settings = pki.settings(None);
    let daemon = Daemon::start_with(&db, move |config| {
        config.tls = Some(settings);
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = daemon.admin_addr.expect("an admin listener");
    let response = pki
        .http(false)
        .build()
        .unwrap()
        .get(format!("https://localhost:{}/metrics", admin.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("actionsd_"));
    let plain = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let result = plain.get(format!("http://{admin}/metrics")).send().await;
    assert!(result.is_err(), "{result:?}");
    daemon.stop().await;
}

/// SIGHUP reloads the files at once, without waiting for the next check.
#[tokio::test]
async fn sighup_reloads_the_certificate() {
    use tokio::io::AsyncBufReadExt;
    let pki = Pki::new();
    let first = pki.issue("server", 1, false);
    let config = pki.path("actionsd.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nreload_interval = \"1h\"\n",
            pki.path("server.pem"),
            pki.path("server.key")
        ),
    )
    .unwrap();
    let store = format!("sqlite://{}", pki.path("actionsd.db").display());
    let mut child = tokio::process::Command::new(ACTIONSD)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--config")
        .arg(&config)
        .args(["--database-url", &store])
        .env_remove("ACTIONSD_CONFIG")
        .env_remove("ACTIONSD_LISTEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: std::net::SocketAddr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["message"] == "actionsd listening" {
                assert_eq!(entry["tls"], true, "{line}");
                return entry["address"].as_str().unwrap().parse().unwrap();
            }
        }
        panic!("the daemon exited without listening");
    })
    .await
    .expect("the daemon listens in time");
    assert_eq!(presented_certificate(addr, &pki).await, first);

    let second = pki.issue("server", 2, false);
    // The files are checked only hourly: the old certificate stays until
    // SIGHUP.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presented_certificate(addr, &pki).await, first);
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: signals the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while presented_certificate(addr, &pki).await != second {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGTERM still stops it gracefully.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A connection that never finishes its handshake is closed after
/// `tls.handshake_timeout`.
#[tokio::test]
async fn a_stalled_handshake_is_closed_after_the_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    pki.issue("server", 1, false);
    let db = TestDb::sqlite();
    let mut settings = pki.settings(None);
    settings.handshake_timeout = Duration::from_millis(300);
    let daemon = Daemon::start_with(&db, move |config| config.tls = Some(settings)).await;
    let mut tcp = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(TIMEOUT, tcp.read(&mut buf))
        .await
        .expect("the daemon closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    daemon.stop().await;
}
