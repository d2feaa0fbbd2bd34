//! The blob store: code bundles, offloaded inputs, task outputs and logs.
//!
//! A local directory by default (under the data directory), or any
//! S3-compatible object store for several hosts, both through the
//! `object_store` crate. Keys are relative to the store's root; the
//! *native URI* of a key is what tasks read and write (a plain absolute
//! path for the local directory, `s3://bucket/prefix/key` for S3), so the
//! daemon, the executor's tasks and the Flyte SDK name one object the same
//! way.
//!
//! Uploads from clients go through URLs that actionsd signs and serves
//! itself (see [`Signer`] and `rpc::blob_http`): HMAC-SHA256 over the
//! method, key, expiry, Content-MD5 and size limit, so a URL cannot be
//! reused for another object, after it expires, or for other content.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use hmac::{Hmac, Mac};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, PutPayload};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::domain::{Error, RunId};

/// Where blobs live.
#[derive(Debug, Clone)]
pub enum BlobLocation {
    /// A local directory (created if missing).
    Local(PathBuf),
    /// `s3://bucket[/prefix]` with its connection settings.
    S3(S3Settings),
}

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    pub prefix: String,
    /// e.g. `http://127.0.0.1:9000` for a self-hosted S3-compatible store.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    /// Allow a plain-HTTP endpoint.
    pub allow_http: bool,
}

impl BlobLocation {
    /// Parses `blobs.url`: `s3://bucket/prefix`, `file:///dir` or a path.
    pub fn parse(url: &str, s3: S3Settings) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("s3:// URL without a bucket".to_owned());
            }
            return Ok(Self::S3(S3Settings {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
                ..s3
            }));
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !path.starts_with('/') {
            return Err("expected s3://bucket/prefix or an absolute path".to_owned());
        }
        Ok(Self::Local(PathBuf::from(path)))
    }
}

/// Limits of the blob store's HTTP and RPC surface.
#[derive(Debug, Clone)]
pub struct BlobLimits {
    /// Largest upload through a signed URL, in bytes.
    pub max_upload_bytes: u64,
    /// Longest validity of a signed URL.
    pub max_url_ttl: Duration,
    /// Largest log of one attempt, in bytes of log text.
    pub max_attempt_log_bytes: u64,
}

impl Default for BlobLimits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 256 * 1024 * 1024,
            max_url_ttl: Duration::from_secs(3600),
            max_attempt_log_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The blob store actionsd reads and writes.
#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// The native URI of the root, without a trailing `/`.
    root: String,
    /// The environment tasks need to reach the store (S3 credentials and
    /// endpoint), as the Flyte SDK reads it.
    task_env: Vec<(String, String)>,
    signer: Signer,
    pub limits: BlobLimits,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs").field("root", &self.root).finish()
    }
}

/// How long one object store call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn store_error(what: &str, err: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %err, "blob store: {what} failed");
    Error::Unavailable(format!("the blob store cannot {what}"))
}

impl Blobs {
    pub fn open(
        location: &BlobLocation,
        signing_key: &SecretString,
        limits: BlobLimits,
    ) -> Result<Self, String> {
        match location {
            BlobLocation::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let dir = dir
                    .canonicalize()
                    .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| e.to_string())?;
                Ok(Self {
                    store: Arc::new(store),
                    root: dir.to_string_lossy().trim_end_matches('/').to_owned(),
                    task_env: Vec::new(),
                    signer: Signer::new(signing_key),
                    limits,
                })
            }
            BlobLocation::S3(s3) => {
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_allow_http(s3.allow_http);
                let mut task_env = vec![("AWS_REGION".to_owned(), s3.region.clone())];
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                    // The Flyte SDK's S3 storage reads these (flyte/storage).
                    task_env.push(("FLYTE_AWS_ENDPOINT".to_owned(), endpoint.clone()));
                    task_env.push(("AWS_ENDPOINT_URL".to_owned(), endpoint.clone()));
                    task_env.push((
                        "FLYTE_AWS_S3_ADDRESSING_STYLE".to_owned(),
                        "path".to_owned(),
                    ));
                }
                if let Some(id) = &s3.access_key_id {
                    builder = builder.with_access_key_id(id);
                    task_env.push(("FLYTE_AWS_ACCESS_KEY_ID".to_owned(), id.clone()));
                    task_env.push(("AWS_ACCESS_KEY_ID".to_owned(), id.clone()));
                }
                if let Some(secret) = &s3.secret_access_key {
                    let secret = secret.expose_secret().to_owned();
                    builder = builder.with_secret_access_key(&secret);
                    task_env.push(("FLYTE_AWS_SECRET_ACCESS_KEY".to_owned(), secret.clone()));
                    task_env.push(("AWS_SECRET_ACCESS_KEY".to_owned(), secret));
                }
                let store = builder.build().map_err(|e| e.to_string())?;
                let root = if s3.prefix.is_empty() {
                    format!("s3://{}", s3.bucket)
                } else {
                    format!("s3://{}/{}", s3.bucket, s3.prefix)
                };
                let store: Arc<dyn ObjectStore> = if s3.prefix.is_empty() {
                    Arc::new(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(
                        store,
                        Path::from(s3.prefix.as_str()),
                    ))
                };
                Ok(Self {
                    store,
                    root,
                    task_env,
                    signer: Signer::new(signing_key),
                    limits,
                })
            }
        }
    }

    /// The native URI of `key`.
    pub fn uri(&self, key: &Path) -> String {
        format!("{}/{}", self.root, key)
    }

    /// The key of a native URI under this store's root, if it is one.
    pub fn key_of(&self, uri: &str) -> Option<Path> {
        let rest = uri
            .strip_prefix("file://")
            .unwrap_or(uri)
            .strip_prefix(&self.root)?
            .strip_prefix('/')?;
        Path::parse(rest).ok().filter(|p| p.parts().count() > 0)
    }

    /// What tasks need in their environment to use this store.
    pub fn task_env(&self) -> &[(String, String)] {
        &self.task_env
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub async fn put(&self, key: &Path, bytes: Bytes) -> Result<(), Error> {
        tokio::time::timeout(CALL_TIMEOUT, self.store.put(key, PutPayload::from(bytes)))
            .await
            .map_err(|_| store_error("write", "timed out"))?
            .map_err(|e| store_error("write", e))?;
        Ok(())
    }

    /// Reads `key`, refusing objects larger than `max` bytes; `None` when
    /// there is no such object.
    pub async fn get(&self, key: &Path, max: u64) -> Result<Option<Bytes>, Error> {
        let read = async {
            let result = match self.store.get(key).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(store_error("read", e)),
            };
            if result.meta.size > max {
                return Err(Error::ResourceExhausted(format!(
                    "{} is {} bytes; the limit is {max}",
                    self.uri(key),
                    result.meta.size
                )));
            }
            result
                .bytes()
                .await
                .map(Some)
                .map_err(|e| store_error("read", e))
        };
        tokio::time::timeout(CALL_TIMEOUT, read)
            .await
            .map_err(|_| store_error("read", "timed out"))?
    }

    /// Opens `key` for streaming: its size and its bytes; `None` when there
    /// is no such object. Opening is bounded by the store call timeout; the
    /// stream by the reader's.
    pub async fn read_stream(
        &self,
        key: &Path,
    ) -> Result<
        Option<(
            u64,
            futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
        )>,
        Error,
    > {
        match tokio::time::timeout(CALL_TIMEOUT, self.store.get(key)).await {
            Err(_) => Err(store_error("read", "timed out")),
            Ok(Ok(result)) => Ok(Some((result.meta.size, result.into_stream()))),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(store_error("read", e)),
        }
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &Path) -> Result<bool, Error> {
        match tokio::time::timeout(CALL_TIMEOUT, self.store.head(key)).await {
            Err(_) => Err(store_error("read", "timed out")),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(false),
            Ok(Err(e)) => Err(store_error("read", e)),
        }
    }

    /// The objects directly under `prefix` (names and sizes), by name.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<(Path, u64)>, Error> {
        let list = async {
            let mut items: Vec<(Path, u64)> = self
                .store
                .list(Some(prefix))
                .map_ok(|meta| (meta.location, meta.size))
                .try_collect()
                .await
                .map_err(|e| store_error("list", e))?;
            items.sort();
            Ok(items)
        };
        tokio::time::timeout(CALL_TIMEOUT, list)
            .await
            .map_err(|_| store_error("list", "timed out"))?
    }

    /// Deletes every object under `prefix` (deleting what is already gone
    /// succeeds). Returns how many objects were deleted.
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<u64, Error> {
        let delete = async {
            let locations = self
                .store
                .list(Some(prefix))
                .map_ok(|meta| meta.location)
                .boxed();
            let deleted: Vec<Path> = self
                .store
                .delete_stream(locations)
                .try_collect()
                .await
                .map_err(|e| store_error("delete", e))?;
            Ok(deleted.len() as u64)
        };
        tokio::time::timeout(CALL_TIMEOUT, delete)
            .await
            .map_err(|_| store_error("delete", "timed out"))?
    }
}

/// A path segment; empty values (an open-source org) become `_`.
fn part(value: &str) -> PathPart<'static> {
    PathPart::from(if value.is_empty() { "_" } else { value }.to_owned())
}

/// Keys, in one place so every reader and writer agrees.
pub mod keys {
    use super::*;

    /// Everything a run writes: `runs/<org>/<project>/<domain>/<run>`.
    pub fn run_base(run: &RunId) -> Path {
        Path::from_iter([
            part("runs"),
            part(&run.org),
            part(&run.project),
            part(&run.domain),
            part(&run.name),
        ])
    }

    /// Every log of a run: `logs/<org>/<project>/<domain>/<run>`.
    pub fn run_logs(run: &RunId) -> Path {
        Path::from_iter([
            part("logs"),
            part(&run.org),
            part(&run.project),
            part(&run.domain),
            part(&run.name),
        ])
    }

    /// Offloaded run inputs, by content: `inputs/<org>/<project>/<domain>/<sha256>/inputs.pb`.
    pub fn inputs(org: &str, project: &str, domain: &str, digest: &str) -> Path {
        Path::from_iter([
            part("inputs"),
            part(org),
            part(project),
            part(domain),
            part(digest),
            part("inputs.pb"),
        ])
    }

    /// Uploaded files (code bundles): `uploads/<org>/<project>/<domain>/<root>/<filename>`.
    pub fn upload(org: &str, project: &str, domain: &str, root: &str, filename: &str) -> Path {
        Path::from_iter([
            part("uploads"),
            part(org),
            part(project),
            part(domain),
            part(root),
            part(filename),
        ])
    }

    /// One attempt's log chunks: `logs/<org>/<project>/<domain>/<run>/<action>/<attempt>/`.
    pub fn log_dir(id: &crate::domain::ActionId, attempt: u32) -> Path {
        Path::from_iter([
            part("logs"),
            part(&id.run.org),
            part(&id.run.project),
            part(&id.run.domain),
            part(&id.run.name),
            part(&id.name),
            part(&attempt.to_string()),
        ])
    }

    /// Chunk `sequence` of an attempt's log; names sort in sequence order.
    pub fn log_chunk(id: &crate::domain::ActionId, attempt: u32, sequence: u32) -> Path {
        log_dir(id, attempt).child(format!("{sequence:010}.pb"))
    }
}

/// Signs and checks the URLs actionsd serves blobs through.
#[derive(Clone)]
pub struct Signer {
    key: Arc<[u8]>,
}

/// What a signed upload URL allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadGrant {
    pub key: String,
    /// Unix seconds.
    pub expires: i64,
    /// Base64 of the MD5 the body must have (empty: any).
    pub content_md5: String,
    pub max_bytes: u64,
}

/// What a signed download URL allows: reading one object until it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadGrant {
    pub key: String,
    /// Unix seconds.
    pub expires: i64,
}

impl Signer {
    pub fn new(key: &SecretString) -> Self {
        Self {
            key: Arc::from(key.expose_secret().as_bytes()),
        }
    }

    /// The MAC of a verb and its fields, each line-terminated; the verb
    /// keeps an upload signature from being valid as a download one.
    fn mac(&self, fields: &[&str]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        for field in fields {
            mac.update(field.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    fn upload_mac(&self, grant: &UploadGrant) -> Hmac<Sha256> {
        self.mac(&[
            "PUT",
            &grant.key,
            &grant.expires.to_string(),
            &grant.content_md5,
            &grant.max_bytes.to_string(),
        ])
    }

    fn download_mac(&self, grant: &DownloadGrant) -> Hmac<Sha256> {
        self.mac(&["GET", &grant.key, &grant.expires.to_string()])
    }

    /// The signature (hex) of `grant`.
    pub fn sign(&self, grant: &UploadGrant) -> String {
        hex::encode(self.upload_mac(grant).finalize().into_bytes())
    }

    /// Checks `signature` in constant time.
    pub fn verify(&self, grant: &UploadGrant, signature: &str) -> bool {
        match hex::decode(signature) {
            Ok(bytes) => self.upload_mac(grant).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    /// The signature (hex) of a download grant.
    pub fn sign_download(&self, grant: &DownloadGrant) -> String {
        hex::encode(self.download_mac(grant).finalize().into_bytes())
    }

    /// Checks a download signature in constant time.
    pub fn verify_download(&self, grant: &DownloadGrant, signature: &str) -> bool {
        match hex::decode(signature) {
            Ok(bytes) => self.download_mac(grant).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }
}

/// The signing key kept in `dir/signing.key`, created (random, 0600) on
/// first use, so signed URLs stay valid across restarts of one daemon.
/// Daemons sharing an S3 store must share `blobs.signing_key` instead.
pub fn local_signing_key(dir: &FsPath) -> Result<SecretString, String> {
    let path = dir.join("signing.key");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(SecretString::from(text.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let key: [u8; 32] = rand::random();
    let text = hex::encode(key);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        // Another daemon created it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return local_signing_key(dir);
        }
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> UploadGrant {
        UploadGrant {
            key: "uploads/_/p/d/x/fast.tar.gz".into(),
            expires: 1_900_000_000,
            content_md5: "1B2M2Y8AsgTpgAmY7PhCfg==".into(),
            max_bytes: 1024,
        }
    }

    #[test]
    fn signatures_bind_every_field() {
        let signer = Signer::new(&SecretString::from("k1"));
        let signature = signer.sign(&grant());
        assert!(signer.verify(&grant(), &signature));
        for changed in [
            UploadGrant {
                key: "uploads/other".into(),
                ..grant()
            },
            UploadGrant {
                expires: 1_900_000_001,
                ..grant()
            },
            UploadGrant {
                content_md5: String::new(),
                ..grant()
            },
            UploadGrant {
                max_bytes: 1025,
                ..grant()
            },
        ] {
            assert!(!signer.verify(&changed, &signature), "{changed:?}");
        }
        assert!(!Signer::new(&SecretString::from("k2")).verify(&grant(), &signature));
        assert!(!signer.verify(&grant(), "not hex"));
    }

    #[test]
    fn download_signatures_bind_key_and_expiry_and_differ_from_uploads() {
        let signer = Signer::new(&SecretString::from("k1"));
        let download = DownloadGrant {
            key: "uploads/x".into(),
            expires: 1_900_000_000,
        };
        let signature = signer.sign_download(&download);
        assert!(signer.verify_download(&download, &signature));
        for changed in [
            DownloadGrant {
                key: "uploads/y".into(),
                ..download.clone()
            },
            DownloadGrant {
                expires: 1_900_000_001,
                ..download.clone()
            },
        ] {
            assert!(!signer.verify_download(&changed, &signature), "{changed:?}");
        }
        assert!(!signer.verify(&grant(), &signature));
    }

    #[test]
    fn native_uris_map_back_to_keys() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(
            &BlobLocation::Local(dir.path().to_owned()),
            &SecretString::from("k"),
            BlobLimits::default(),
        )
        .unwrap();
        let key = keys::inputs("", "p", "d", "abc");
        let uri = blobs.uri(&key);
        assert!(
            uri.starts_with('/') && uri.ends_with("/inputs/_/p/d/abc/inputs.pb"),
            "{uri}"
        );
        assert_eq!(blobs.key_of(&uri), Some(key.clone()));
        assert_eq!(blobs.key_of(&format!("file://{uri}")), Some(key));
        assert_eq!(blobs.key_of("/elsewhere/x"), None);
        // Client-chosen segments cannot leave their place in the tree.
        let upload = keys::upload("", "p", "d", "..", "a/b");
        assert_eq!(upload.parts().count(), 6, "{upload}");
        assert!(!blobs.uri(&upload).contains("/../"), "{upload}");
        assert_eq!(blobs.key_of("s3://bucket/x"), None);
    }

    #[test]
    fn locations_parse() {
        let s3 = S3Settings {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
        };
        match BlobLocation::parse("s3://b/some/prefix/", s3.clone()).unwrap() {
            BlobLocation::S3(s) => {
                assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("b", "some/prefix"))
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(BlobLocation::parse("file:///tmp/x", s3.clone()), Ok(BlobLocation::Local(p)) if p == FsPath::new("/tmp/x"))
        );
        assert!(BlobLocation::parse("relative", s3.clone()).is_err());
        assert!(BlobLocation::parse("s3://", s3).is_err());
    }
}
