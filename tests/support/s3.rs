//! A real S3-compatible server for the input tests: `moto_server` (PyPI `moto[server]`,
//! installed by `scripts/lib.sh`'s `ensure_s3_server`) on a free port of 127.0.0.1, in memory,
//! killed on drop. Buckets are made with a plain HTTP request, objects put with `object_store`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::free_port;

/// A running moto server.
pub struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    /// Starts one and waits until it answers.
    pub fn start() -> Self {
        let port = free_port();
        let server = S3Server { child: Self::spawn(port), port };
        server.wait_answering();
        server
    }

    fn spawn(port: u16) -> Child {
        Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): install it with `pip install 'moto[server]'` (scripts/test.sh does)")
            })
    }

    fn wait_answering(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.request("GET", "/", &[]).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not answer on port {} within 30 s", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server and starts a new one on the same port, waiting until it answers. moto
    /// keeps its state in memory: the new one is empty until buckets and objects are put again
    /// (the same bytes get the same ETag, their MD5).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port);
        self.wait_answering();
    }

    /// From now on every request must be signed with a key moto's IAM knows (none are made, so
    /// every key is refused with 403 InvalidAccessKeyId): moto's `/moto-api/reset-auth`, the
    /// server-mode form of `INITIAL_NO_AUTH_ACTION_COUNT=0`. Put the objects before.
    pub fn enforce_auth(&self) {
        let status = self.request("POST", "/moto-api/reset-auth", b"0").expect("reset-auth");
        assert_eq!(status, 200, "moto reset-auth");
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a fetcher or `saver verify` needs to reach it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_at(&self.endpoint())
    }

    /// [`S3Server::env`] reaching it at `endpoint` (through a proxy).
    pub fn env_at(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", endpoint.to_string()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test-key-id".into()),
            ("AWS_SECRET_ACCESS_KEY", "test-secret-key".into()),
        ]
    }

    /// Sends one request; returns the status code.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response);
        text.split(' ').nth(1).and_then(|code| code.parse().ok()).ok_or_else(|| std::io::Error::other("no status"))
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let status = self.request("PUT", &format!("/{bucket}"), &[]).expect("create bucket");
        assert_eq!(status, 200, "create bucket {bucket}");
    }

    /// A signed client of `bucket`.
    fn client(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        // As the input crate does: ring's provider for rustls (Err: one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test-key-id")
            .with_secret_access_key("test-secret-key")
            .with_bucket_name(bucket)
            .build()
            .expect("an S3 client")
    }

    /// The keys under `prefix` in `bucket`, sorted.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let store = self.client(bucket);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let prefix = object_store::path::Path::from(prefix);
        let listed: Vec<object_store::ObjectMeta> =
            runtime.block_on(store.list(Some(&prefix)).try_collect()).expect("list objects");
        let mut keys: Vec<String> = listed.into_iter().map(|meta| meta.location.to_string()).collect();
        keys.sort();
        keys
    }

    /// The bytes of an object.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        let store = self.client(bucket);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let path = object_store::path::Path::from(key);
        runtime.block_on(async { store.get(&path).await?.bytes().await }).expect("get object").to_vec()
    }

    /// Puts (or overwrites) an object, signed as a client would (moto refuses unsigned writes
    /// once signed requests have been seen).
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        use object_store::ObjectStoreExt;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test-key-id")
            .with_secret_access_key("test-secret-key")
            .with_bucket_name(bucket)
            .build()
            .expect("an S3 client");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let payload = object_store::PutPayload::from(body.to_vec());
        runtime.block_on(store.put(&object_store::path::Path::from(key), payload)).expect("put object");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
