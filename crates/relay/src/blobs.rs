//! An S3-compatible object store for the run's large, immutable bytes (`--blobs s3://bucket/prefix`):
//! model versions' weights and outer momentum, and their manifests. Objects are
//! **content-addressed** (`<prefix>/sha256/<hex>`), so a relay that lost the lead and still
//! writes leaves only unreferenced objects behind: it can never overwrite what the run's
//! database points to.
//!
//! The client is `object_store`'s (async); the relay's store is synchronous, so calls run on a
//! small runtime of their own.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::sql::blocking;

/// The object store of a run.
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Blobs {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside the relay's own runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blobs({})", self.url)
    }
}

impl Blobs {
    /// Opens `s3://bucket[/prefix]`. Credentials, region and endpoint come from the usual
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` for a server other than AWS, `AWS_ALLOW_HTTP=true` for plain HTTP).
    pub fn open(url: &str) -> Result<Self> {
        let Some(rest) = url.strip_prefix("s3://") else {
            bail!("--blobs {url:?}: expected s3://bucket or s3://bucket/prefix");
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("--blobs {url:?} names no bucket");
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
            builder = builder
                .with_endpoint(&endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = builder
            .build()
            .with_context(|| format!("opening the object store {url}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("blobs")
            .enable_all()
            .build()?;
        Ok(Blobs {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
            rt: Some(rt),
        })
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        blocking(|| rt.block_on(f))
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The key of bytes with this SHA-256.
    pub fn key(sha256: &[u8; 32]) -> String {
        format!("sha256/{}", hex::encode(sha256))
    }

    /// Stores `bytes` under their SHA-256 (writing them again is harmless); returns the key.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let key = Self::key(&tessera_protocol::work::sha256(bytes));
        let path = self.path(&key);
        let payload = PutPayload::from(bytes.to_vec());
        let store = self.store.clone();
        self.block_on(async move { store.put(&path, payload).await })
            .with_context(|| format!("putting {key} into {}", self.url))?;
        Ok(key)
    }

    /// Reads the object at `key` and checks it holds the bytes its name says.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key);
        let store = self.store.clone();
        let bytes = self
            .block_on(async move {
                let got = store.get(&path).await?;
                got.bytes().await
            })
            .with_context(|| format!("getting {key} from {}", self.url))?;
        if let Some(hex_name) = key.strip_prefix("sha256/") {
            let actual = hex::encode(tessera_protocol::work::sha256(&bytes));
            if actual != hex_name {
                bail!(
                    "{key} in {} holds other bytes (their SHA-256 is {actual})",
                    self.url
                );
            }
        }
        Ok(bytes.to_vec())
    }
}
