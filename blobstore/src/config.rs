//! Store configuration: one struct, buildable from a URL.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::signer::Signer;
use serde::Deserialize;
use url::Url;
use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::store::StoreId;
use crate::urn::{StorageType, check_bucket, check_file_name, check_provider};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Default size of one multipart upload part (and the size above which puts go multipart).
pub const DEFAULT_PART_SIZE: usize = 8 * MIB as usize;
/// Smallest part size S3 and GCS accept (every part but the last).
pub const MIN_CLOUD_PART_SIZE: usize = 5 * MIB as usize;
/// Smallest part size for the memory and filesystem backends.
pub const MIN_LOCAL_PART_SIZE: usize = 4 * KIB as usize;
/// Largest part size (the S3 limit).
pub const MAX_PART_SIZE: usize = 5 * GIB as usize;
/// Default number of parts uploaded at once by one streaming put.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;
/// Most parts uploaded at once by one streaming put.
pub const MAX_UPLOAD_CONCURRENCY: usize = 64;
/// Default limit for whole-buffer reads ([`BlobStore::get`](crate::BlobStore::get)).
pub const DEFAULT_MAX_GET_SIZE: u64 = GIB;
/// Provider name of the memory and filesystem backends.
pub const LOCAL_PROVIDER: &str = "local";
/// Default bucket name of the filesystem backend.
pub const DEFAULT_FS_BUCKET: &str = "blobs";
/// Default bucket name of the memory backend.
pub const DEFAULT_MEM_BUCKET: &str = "mem";
/// Default provider name of the S3 backend.
pub const DEFAULT_S3_PROVIDER: &str = "aws";
/// Default provider name of the GCS backend.
pub const DEFAULT_GCS_PROVIDER: &str = "gcp";
/// Default provider name of the Azure backend.
pub const DEFAULT_AZURE_PROVIDER: &str = "azure";

/// Everything needed to open a [`BlobStore`](crate::BlobStore).
///
/// Build one in code, deserialize it (e.g. from a TOML file), or parse it from a URL with
/// [`StoreConfig::from_url`] / [`str::parse`]; see the crate documentation for the URL forms.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Where the blobs live.
    pub backend: Backend,
    /// Object path prefix for new blobs (segments as in a URN `file_name`), e.g. `veil/blobs`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Size of one multipart part; blobs up to this size are written with one conditional put.
    #[serde(default = "default_part_size")]
    pub part_size: usize,
    /// Parts in flight at once during a streaming put. Memory used by one streaming put is about
    /// `(upload_concurrency + 1) * part_size`.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
    /// Largest blob [`BlobStore::get`](crate::BlobStore::get) reads into memory; stream bigger ones.
    #[serde(default = "default_max_get_size")]
    pub max_get_size: u64,
}

fn default_part_size() -> usize {
    DEFAULT_PART_SIZE
}
fn default_upload_concurrency() -> usize {
    DEFAULT_UPLOAD_CONCURRENCY
}
fn default_max_get_size() -> u64 {
    DEFAULT_MAX_GET_SIZE
}

/// The storage service behind a store.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum Backend {
    /// Process memory. URNs: `urn:blob:v1:mem:local:{bucket}:…`.
    Mem {
        /// Bucket name in URNs (default `mem`).
        #[serde(default = "default_mem_bucket")]
        bucket: String,
    },
    /// A local directory (created if missing). URNs: `urn:blob:v1:fs:local:{bucket}:…`.
    Fs {
        /// Directory holding the blobs.
        root: PathBuf,
        /// Bucket name in URNs (default `blobs`).
        #[serde(default = "default_fs_bucket")]
        bucket: String,
        /// Flush files and directories to disk before a put returns (default true).
        #[serde(default = "default_true")]
        fsync: bool,
        /// With `fsync`, let concurrent puts share one flush of the filesystem (`syncfs`)
        /// instead of flushing each file and directory (default true; used on Linux 5.8 or
        /// later only, where `syncfs` reports write-back errors).
        #[serde(default = "default_true")]
        group_fsync: bool,
    },
    /// Amazon S3 or an S3-compatible service.
    S3(S3Config),
    /// Google Cloud Storage.
    Gcs(GcsConfig),
    /// Azure Blob Storage.
    Azure(AzureConfig),
}

fn default_mem_bucket() -> String {
    DEFAULT_MEM_BUCKET.to_owned()
}
fn default_fs_bucket() -> String {
    DEFAULT_FS_BUCKET.to_owned()
}
fn default_true() -> bool {
    true
}
fn default_s3_provider() -> String {
    DEFAULT_S3_PROVIDER.to_owned()
}
fn default_gcs_provider() -> String {
    DEFAULT_GCS_PROVIDER.to_owned()
}
fn default_azure_provider() -> String {
    DEFAULT_AZURE_PROVIDER.to_owned()
}

/// Amazon S3 or S3-compatible (MinIO, R2, Ceph, moto, …) settings.
///
/// Anything not set here comes from the `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
/// …) and then from the usual instance / container / web-identity credential sources.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct S3Config {
    /// Bucket name (also the URN bucket).
    pub bucket: String,
    /// Provider name in URNs (default `aws`; e.g. `minio`, `r2`).
    #[serde(default = "default_s3_provider")]
    pub provider: String,
    /// Region (e.g. `us-east-1`; `auto` for R2).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL for S3-compatible services, e.g. `http://127.0.0.1:9000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allow plain-HTTP endpoints.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Path-style requests (`endpoint/bucket/key`, object_store's default) when true,
    /// virtual-hosted style (`bucket.endpoint/key`) when false.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Static credentials; when absent they come from the environment.
    #[serde(default)]
    pub credentials: Option<S3Credentials>,
    /// Further `object_store` S3 options by name (`aws_…` or short form, e.g.
    /// `checksum_algorithm`, `skip_signature`, `timeout`). Credential options are refused here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl S3Config {
    /// Settings for `bucket`, everything else from the environment.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            provider: default_s3_provider(),
            region: None,
            endpoint: None,
            allow_http: None,
            path_style: None,
            credentials: None,
            options: BTreeMap::new(),
        }
    }

    /// Sets the URN provider name.
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = provider.into();
        self
    }

    /// Sets the region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the endpoint URL.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Allows (or forbids) plain HTTP.
    pub fn with_allow_http(mut self, allow: bool) -> Self {
        self.allow_http = Some(allow);
        self
    }

    /// Chooses path-style (true) or virtual-hosted-style (false) requests.
    pub fn with_path_style(mut self, path_style: bool) -> Self {
        self.path_style = Some(path_style);
        self
    }

    /// Sets static credentials.
    pub fn with_credentials(mut self, credentials: S3Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Sets a further `object_store` option by name.
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }
}

/// Static S3 credentials. `Debug` shows the access key id only; the secret and session token
/// are wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
}

impl S3Credentials {
    /// An access key pair.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }

    /// Adds a session token (temporary credentials).
    pub fn with_session_token(mut self, token: impl Into<String>) -> Self {
        self.session_token = Some(token.into());
        self
    }

    /// The access key id (not secret).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Drop for S3Credentials {
    fn drop(&mut self) {
        self.secret_access_key.zeroize();
        self.session_token.zeroize();
    }
}

/// Google Cloud Storage settings. Credentials come from `service_account_path`, or from the
/// `GOOGLE_*` environment variables (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_APPLICATION_CREDENTIALS`,
/// …), or from the metadata server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GcsConfig {
    /// Bucket name (also the URN bucket).
    pub bucket: String,
    /// Provider name in URNs (default `gcp`).
    #[serde(default = "default_gcs_provider")]
    pub provider: String,
    /// Path of a service account JSON file.
    #[serde(default)]
    pub service_account_path: Option<PathBuf>,
    /// Further `object_store` GCS options by name (`google_…` or short form, e.g. `base_url`).
    /// Credential options are refused here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl GcsConfig {
    /// Settings for `bucket`, everything else from the environment.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            provider: default_gcs_provider(),
            service_account_path: None,
            options: BTreeMap::new(),
        }
    }

    /// Sets the URN provider name.
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = provider.into();
        self
    }

    /// Sets the service account file.
    pub fn with_service_account_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.service_account_path = Some(path.into());
        self
    }

    /// Sets a further `object_store` option by name.
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }
}

/// Azure Blob Storage settings. Credentials come from the `AZURE_*` environment variables
/// (`AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, `AZURE_CLIENT_ID` /
/// `AZURE_CLIENT_SECRET` / `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, …) or managed identity.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AzureConfig {
    /// Container name (also the URN bucket).
    pub container: String,
    /// Provider name in URNs (default `azure`).
    #[serde(default = "default_azure_provider")]
    pub provider: String,
    /// Storage account name (else `AZURE_STORAGE_ACCOUNT_NAME`).
    #[serde(default)]
    pub account: Option<String>,
    /// Use the Azurite emulator's well-known account and endpoint.
    #[serde(default)]
    pub use_emulator: bool,
    /// Further `object_store` Azure options by name (`azure_…` or short form, e.g. `endpoint`).
    /// Credential options are refused here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl AzureConfig {
    /// Settings for `container`, everything else from the environment.
    pub fn new(container: impl Into<String>) -> Self {
        Self {
            container: container.into(),
            provider: default_azure_provider(),
            account: None,
            use_emulator: false,
            options: BTreeMap::new(),
        }
    }

    /// Sets the URN provider name.
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = provider.into();
        self
    }

    /// Sets the storage account.
    pub fn with_account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// Uses the Azurite emulator.
    pub fn with_emulator(mut self, use_emulator: bool) -> Self {
        self.use_emulator = use_emulator;
        self
    }

    /// Sets a further `object_store` option by name.
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }
}

impl StoreConfig {
    /// A configuration for `backend` with default tuning.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            prefix: None,
            part_size: DEFAULT_PART_SIZE,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            max_get_size: DEFAULT_MAX_GET_SIZE,
        }
    }

    /// An in-memory store with bucket `mem`.
    pub fn memory() -> Self {
        Self::new(Backend::Mem {
            bucket: default_mem_bucket(),
        })
    }

    /// A filesystem store in `root` with bucket `blobs` and fsync on.
    pub fn fs(root: impl Into<PathBuf>) -> Self {
        Self::new(Backend::Fs {
            root: root.into(),
            bucket: default_fs_bucket(),
            fsync: true,
            group_fsync: true,
        })
    }

    /// An S3 store.
    pub fn s3(config: S3Config) -> Self {
        Self::new(Backend::S3(config))
    }

    /// A GCS store.
    pub fn gcs(config: GcsConfig) -> Self {
        Self::new(Backend::Gcs(config))
    }

    /// An Azure store.
    pub fn azure(config: AzureConfig) -> Self {
        Self::new(Backend::Azure(config))
    }

    /// Sets the object path prefix of new blobs.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Sets the multipart part size.
    pub fn with_part_size(mut self, part_size: usize) -> Self {
        self.part_size = part_size;
        self
    }

    /// Sets how many parts one streaming put uploads at once.
    pub fn with_upload_concurrency(mut self, upload_concurrency: usize) -> Self {
        self.upload_concurrency = upload_concurrency;
        self
    }

    /// Sets the whole-buffer read limit.
    pub fn with_max_get_size(mut self, max_get_size: u64) -> Self {
        self.max_get_size = max_get_size;
        self
    }

    /// The storage type, provider and bucket this configuration's URNs carry.
    pub fn store_id(&self) -> StoreId {
        let (storage_type, provider, bucket) = match &self.backend {
            Backend::Mem { bucket } => (StorageType::Mem, LOCAL_PROVIDER, bucket),
            Backend::Fs { bucket, .. } => (StorageType::Fs, LOCAL_PROVIDER, bucket),
            Backend::S3(c) => (StorageType::S3, c.provider.as_str(), &c.bucket),
            Backend::Gcs(c) => (StorageType::Gcs, c.provider.as_str(), &c.bucket),
            Backend::Azure(c) => (StorageType::Azure, c.provider.as_str(), &c.container),
        };
        StoreId {
            storage_type,
            provider: provider.to_owned(),
            bucket: bucket.clone(),
        }
    }

    /// Checks every setting without touching the network or the filesystem.
    pub fn validate(&self) -> Result<()> {
        let id = self.store_id();
        check_provider(&id.provider).map_err(|e| Error::config("provider", e.to_string()))?;
        check_bucket(&id.bucket).map_err(|e| Error::config("bucket", e.to_string()))?;
        if let Some(prefix) = &self.prefix {
            check_file_name(prefix).map_err(|e| {
                Error::config("prefix", e.to_string().replace("file_name", "prefix"))
            })?;
            // Room for the generated `{session}/{task}/{purpose}-{uuid}.veil` (≤ 100 bytes).
            if prefix.len() > 900 {
                return Err(Error::config("prefix", "is longer than 900 bytes"));
            }
        }
        let min_part = match id.storage_type {
            StorageType::Mem | StorageType::Fs => MIN_LOCAL_PART_SIZE,
            _ => MIN_CLOUD_PART_SIZE,
        };
        if !(min_part..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(Error::config(
                "part_size",
                format!(
                    "must be between {min_part} and {MAX_PART_SIZE} bytes for {} stores",
                    id.storage_type
                ),
            ));
        }
        if !(1..=MAX_UPLOAD_CONCURRENCY).contains(&self.upload_concurrency) {
            return Err(Error::config(
                "upload_concurrency",
                format!("must be between 1 and {MAX_UPLOAD_CONCURRENCY}"),
            ));
        }
        if self.max_get_size == 0 {
            return Err(Error::config("max_get_size", "must be at least 1"));
        }
        match &self.backend {
            Backend::Fs { root, .. } if root.as_os_str().is_empty() => {
                Err(Error::config("fs.root", "is empty"))
            }
            Backend::S3(c) => {
                for key in c.options.keys() {
                    s3_option(key)?;
                }
                if let Some(endpoint) = &c.endpoint {
                    check_endpoint("s3.endpoint", endpoint)?;
                }
                Ok(())
            }
            Backend::Gcs(c) => c.options.keys().try_for_each(|k| gcs_option(k).map(drop)),
            Backend::Azure(c) => c.options.keys().try_for_each(|k| azure_option(k).map(drop)),
            _ => Ok(()),
        }
    }

    /// Parses a store URL; see the crate documentation for the forms and options.
    ///
    /// ```
    /// use veil_blobstore::{Backend, StoreConfig};
    ///
    /// let c = StoreConfig::from_url("s3://veil-blobs?endpoint=http://127.0.0.1:9000&allow_http=true&provider=minio")?;
    /// assert_eq!(c.store_id().to_string(), "s3:minio:veil-blobs");
    ///
    /// let c = StoreConfig::from_url("/var/lib/veil/blobs")?;
    /// assert!(matches!(c.backend, Backend::Fs { .. }));
    /// # Ok::<(), veil_blobstore::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::config("url", "is empty"));
        }
        if !url.contains("://") {
            // A plain filesystem path, relative or absolute.
            let config = Self::fs(url);
            config.validate()?;
            return Ok(config);
        }
        let parsed = Url::parse(url)
            .map_err(|e| Error::config("url", format!("is not a valid URL ({e})")))?;
        let scheme = parsed.scheme().to_owned();
        let mut query = Query::new(&parsed)?;
        let host = parsed.host_str().unwrap_or("").to_owned();
        let path_prefix = || -> Option<String> {
            let p = parsed.path().trim_matches('/');
            (!p.is_empty()).then(|| p.to_owned())
        };
        let mut prefix = path_prefix();

        let backend = match scheme.as_str() {
            "mem" | "memory" => {
                let bucket = if host.is_empty() {
                    default_mem_bucket()
                } else {
                    host.clone()
                };
                Backend::Mem { bucket }
            }
            "file" => {
                if !(host.is_empty() || host == "localhost") {
                    return Err(Error::config(
                        "url",
                        "file URLs must be file:///absolute/path",
                    ));
                }
                let root = parsed
                    .to_file_path()
                    .map_err(|()| Error::config("url", "is not an absolute file path"))?;
                prefix = None;
                Backend::Fs {
                    root,
                    bucket: query.take("bucket").unwrap_or_else(default_fs_bucket),
                    fsync: query.take_bool("fsync")?.unwrap_or(true),
                    group_fsync: query.take_bool("group_fsync")?.unwrap_or(true),
                }
            }
            "s3" | "s3a" => {
                let mut c = S3Config::new(require_host(&host, "bucket")?);
                if let Some(p) = query.take("provider") {
                    c.provider = p;
                }
                c.region = query.take("region");
                c.endpoint = query.take("endpoint");
                c.allow_http = query.take_bool("allow_http")?;
                c.path_style = match (
                    query.take_bool("path_style")?,
                    query.take_bool("virtual_hosted_style")?,
                ) {
                    (Some(p), Some(v)) if p == v => {
                        return Err(Error::config(
                            "path_style",
                            "contradicts virtual_hosted_style",
                        ));
                    }
                    (Some(p), _) => Some(p),
                    (None, v) => v.map(|v| !v),
                };
                c.options = query.rest_checked(|k| s3_option(k).map(drop))?;
                Backend::S3(c)
            }
            "gs" | "gcs" => {
                let mut c = GcsConfig::new(require_host(&host, "bucket")?);
                if let Some(p) = query.take("provider") {
                    c.provider = p;
                }
                c.service_account_path = query.take("service_account_path").map(PathBuf::from);
                c.options = query.rest_checked(|k| gcs_option(k).map(drop))?;
                Backend::Gcs(c)
            }
            "az" | "azure" => {
                let mut c = AzureConfig::new(require_host(&host, "container")?);
                if let Some(p) = query.take("provider") {
                    c.provider = p;
                }
                c.account = query.take("account");
                c.use_emulator = query.take_bool("use_emulator")?.unwrap_or(false);
                c.options = query.rest_checked(|k| azure_option(k).map(drop))?;
                Backend::Azure(c)
            }
            other => {
                return Err(Error::config(
                    "url",
                    format!(
                        "unsupported scheme {other:?} (expected mem, file, s3, gs or az, or a plain path)"
                    ),
                ));
            }
        };
        let mut config = Self::new(backend);
        if let Some(p) = query.take("prefix") {
            if prefix.is_some() {
                return Err(Error::config(
                    "prefix",
                    "given both in the URL path and as ?prefix=",
                ));
            }
            prefix = Some(p);
        }
        config.prefix = prefix;
        if let Some(v) = query.take("part_size") {
            config.part_size = usize::try_from(parse_size("part_size", &v)?)
                .map_err(|_| Error::config("part_size", "is too large"))?;
        }
        if let Some(v) = query.take("upload_concurrency") {
            config.upload_concurrency = v
                .parse()
                .map_err(|_| Error::config("upload_concurrency", "is not a number"))?;
        }
        if let Some(v) = query.take("max_get_size") {
            config.max_get_size = parse_size("max_get_size", &v)?;
        }
        query.finish()?;
        config.validate()?;
        Ok(config)
    }

    /// Whether puts into this (filesystem) store are made durable by grouped flushes of the
    /// filesystem rather than by the object store flushing each file and directory.
    pub(crate) fn flushes_grouped(&self) -> bool {
        matches!(
            self.backend,
            Backend::Fs {
                fsync: true,
                group_fsync: true,
                ..
            }
        ) && crate::durable::supported()
    }

    /// Builds the object store, and for S3, GCS and Azure the URL signer (the same client).
    /// Creates the directory of a filesystem store; touches no network.
    pub(crate) fn build_object_store(&self) -> Result<Clients> {
        self.validate()?;
        let build_err = |source| Error::Backend {
            op: "build",
            source,
        };
        Ok(match &self.backend {
            Backend::Mem { .. } => (Arc::new(InMemory::new()), None, None),
            Backend::Fs { root, fsync, .. } => {
                std::fs::create_dir_all(root).map_err(|e| {
                    Error::config("fs.root", format!("cannot create {}: {e}", root.display()))
                })?;
                let fs = LocalFileSystem::new_with_prefix(root).map_err(build_err)?;
                // Blob names make a directory per session and task; the last deletion in one
                // removes it, so retention leaves no empty directories behind.
                let fs = fs.with_automatic_cleanup(true);
                if self.flushes_grouped() {
                    // Writes return once a grouped flush has made them durable.
                    let (store, flushes) = crate::durable::flushed(fs, root).map_err(|e| {
                        Error::config("fs.root", format!("cannot open {}: {e}", root.display()))
                    })?;
                    (store, None, Some(flushes))
                } else {
                    (Arc::new(fs.with_fsync(*fsync)), None, None)
                }
            }
            Backend::S3(c) => {
                let mut b = AmazonS3Builder::from_env();
                for (k, v) in &c.options {
                    b = b.with_config(s3_option(k)?, v);
                }
                b = b.with_bucket_name(&c.bucket);
                if let Some(region) = &c.region {
                    b = b.with_region(region);
                }
                if let Some(endpoint) = &c.endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(allow) = c.allow_http {
                    b = b.with_allow_http(allow);
                }
                if let Some(path_style) = c.path_style {
                    b = b.with_virtual_hosted_style_request(!path_style);
                }
                if let Some(creds) = &c.credentials {
                    b = b
                        .with_access_key_id(&creds.access_key_id)
                        .with_secret_access_key(&creds.secret_access_key);
                    if let Some(token) = &creds.session_token {
                        b = b.with_token(token);
                    }
                }
                with_signer(b.build().map_err(build_err)?)
            }
            Backend::Gcs(c) => {
                let mut b = GoogleCloudStorageBuilder::from_env();
                for (k, v) in &c.options {
                    b = b.with_config(gcs_option(k)?, v);
                }
                b = b.with_bucket_name(&c.bucket);
                if let Some(path) = &c.service_account_path {
                    b = b.with_service_account_path(path.to_string_lossy());
                }
                with_signer(b.build().map_err(build_err)?)
            }
            Backend::Azure(c) => {
                let mut b = MicrosoftAzureBuilder::from_env();
                for (k, v) in &c.options {
                    b = b.with_config(azure_option(k)?, v);
                }
                b = b.with_container_name(&c.container);
                if let Some(account) = &c.account {
                    b = b.with_account(account);
                }
                if c.use_emulator {
                    b = b.with_use_emulator(true);
                }
                with_signer(b.build().map_err(build_err)?)
            }
        })
    }
}

/// A store's object store; where it can sign URLs, the same client as a signer; where its
/// writes are flushed in groups, the flusher (for its count).
pub(crate) type Clients = (
    Arc<dyn ObjectStore>,
    Option<Arc<dyn Signer>>,
    Option<Arc<crate::durable::GroupSync>>,
);

/// One cloud client, used both as the object store and as the URL signer.
fn with_signer<T: ObjectStore + Signer>(client: T) -> Clients {
    let client = Arc::new(client);
    (client.clone(), Some(client), None)
}

impl FromStr for StoreConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::from_url(s)
    }
}

const CREDENTIALS_REFUSED: &str = "credentials are not accepted here (URLs and option maps end up \
     in logs); use S3Config::credentials or the provider's environment variables";

fn s3_option(key: &str) -> Result<AmazonS3ConfigKey> {
    let field = || format!("s3.{key}");
    let parsed: AmazonS3ConfigKey = key
        .parse()
        .map_err(|_| Error::config(field(), "is not a known S3 option"))?;
    // The SSE-C key's enum type is not exported, so that one is recognised by name.
    let sse_customer_key = key.trim_start_matches("aws_") == "sse_customer_key_base64";
    match parsed {
        AmazonS3ConfigKey::SecretAccessKey
        | AmazonS3ConfigKey::AccessKeyId
        | AmazonS3ConfigKey::Token => Err(Error::config(field(), CREDENTIALS_REFUSED)),
        _ if sse_customer_key => Err(Error::config(field(), CREDENTIALS_REFUSED)),
        AmazonS3ConfigKey::Bucket => Err(Error::config(field(), "the bucket is the URL's host")),
        other => Ok(other),
    }
}

fn gcs_option(key: &str) -> Result<GoogleConfigKey> {
    let field = || format!("gcs.{key}");
    let parsed: GoogleConfigKey = key
        .parse()
        .map_err(|_| Error::config(field(), "is not a known GCS option"))?;
    match parsed {
        GoogleConfigKey::ServiceAccountKey | GoogleConfigKey::BearerToken => {
            Err(Error::config(field(), CREDENTIALS_REFUSED))
        }
        GoogleConfigKey::Bucket => Err(Error::config(field(), "the bucket is the URL's host")),
        other => Ok(other),
    }
}

fn azure_option(key: &str) -> Result<AzureConfigKey> {
    let field = || format!("azure.{key}");
    let parsed: AzureConfigKey = key
        .parse()
        .map_err(|_| Error::config(field(), "is not a known Azure option"))?;
    match parsed {
        AzureConfigKey::AccessKey
        | AzureConfigKey::SasKey
        | AzureConfigKey::Token
        | AzureConfigKey::ClientSecret
        | AzureConfigKey::FabricSessionToken => Err(Error::config(field(), CREDENTIALS_REFUSED)),
        AzureConfigKey::ContainerName => {
            Err(Error::config(field(), "the container is the URL's host"))
        }
        other => Ok(other),
    }
}

fn check_endpoint(field: &str, endpoint: &str) -> Result<()> {
    let url =
        Url::parse(endpoint).map_err(|e| Error::config(field, format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::config(field, "must be an http:// or https:// URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::config(field, CREDENTIALS_REFUSED));
    }
    Ok(())
}

fn require_host(host: &str, what: &str) -> Result<String> {
    if host.is_empty() {
        Err(Error::config(what, "is missing (it is the URL's host)"))
    } else {
        Ok(host.to_owned())
    }
}

/// Parses `123`, `64KiB`, `8MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB`, all binary).
pub(crate) fn parse_size(field: &str, s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| Error::config(field, "is not a size (e.g. 8388608, 8MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        _ => {
            return Err(Error::config(
                field,
                "has an unknown unit (use KiB, MiB or GiB)",
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::config(field, "is too large"))
}

/// The query string of a store URL, consumed key by key; leftovers are backend options.
struct Query {
    pairs: BTreeMap<String, String>,
}

impl Query {
    fn new(url: &Url) -> Result<Self> {
        let mut pairs = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            if pairs.insert(k.to_string(), v.into_owned()).is_some() {
                return Err(Error::config(k.to_string(), "is given twice"));
            }
        }
        Ok(Self { pairs })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.pairs.remove(key)
    }

    fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(Error::config(key, "must be true or false")),
            })
            .transpose()
    }

    /// Takes every remaining pair except the common ones, checking each key with `check`.
    fn rest_checked(
        &mut self,
        check: impl Fn(&str) -> Result<()>,
    ) -> Result<BTreeMap<String, String>> {
        const COMMON: [&str; 4] = ["prefix", "part_size", "upload_concurrency", "max_get_size"];
        let keys: Vec<String> = self
            .pairs
            .keys()
            .filter(|k| !COMMON.contains(&k.as_str()))
            .cloned()
            .collect();
        let mut rest = BTreeMap::new();
        for key in keys {
            check(&key)?;
            if let Some(v) = self.pairs.remove(&key) {
                rest.insert(key, v);
            }
        }
        Ok(rest)
    }

    fn finish(self) -> Result<()> {
        match self.pairs.keys().next() {
            None => Ok(()),
            Some(key) => Err(Error::config(
                key.clone(),
                "is not a known option for this scheme",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(c: &StoreConfig) -> &S3Config {
        match &c.backend {
            Backend::S3(s) => s,
            other => panic!("not s3: {other:?}"),
        }
    }

    fn field_of(url: &str) -> String {
        match StoreConfig::from_url(url) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{url:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn memory_urls() {
        for (url, bucket) in [
            ("mem://", "mem"),
            ("mem://scratch", "scratch"),
            ("memory://x", "x"),
        ] {
            let c = StoreConfig::from_url(url).unwrap();
            assert_eq!(
                c.backend,
                Backend::Mem {
                    bucket: bucket.into()
                },
                "{url}"
            );
            assert_eq!(c.store_id().to_string(), format!("mem:local:{bucket}"));
        }
        let c = StoreConfig::from_url("mem://m/some/prefix?part_size=64KiB").unwrap();
        assert_eq!(c.prefix.as_deref(), Some("some/prefix"));
        assert_eq!(c.part_size, 64 * 1024);
    }

    #[test]
    fn filesystem_urls_and_plain_paths() {
        let c = StoreConfig::from_url("file:///var/lib/veil/blobs?bucket=prod-blobs&fsync=false")
            .unwrap();
        assert_eq!(
            c.backend,
            Backend::Fs {
                root: "/var/lib/veil/blobs".into(),
                bucket: "prod-blobs".into(),
                fsync: false,
                group_fsync: true
            }
        );
        assert_eq!(
            c.prefix, None,
            "a file URL's path is the root, not a prefix"
        );
        for path in ["/tmp/veil", "data/blobs", "./blobs"] {
            let c = StoreConfig::from_url(path).unwrap();
            assert_eq!(
                c.backend,
                Backend::Fs {
                    root: path.into(),
                    bucket: "blobs".into(),
                    fsync: true,
                    group_fsync: true
                }
            );
            assert_eq!(c.store_id().to_string(), "fs:local:blobs");
        }
        assert_eq!(field_of("file://host/x"), "url");
        assert_eq!(field_of("file:///x?bucket=Bad"), "bucket");
        assert_eq!(field_of("file:///x?fsync=maybe"), "fsync");
        assert_eq!(field_of("file:///x?group_fsync=2"), "group_fsync");
        let c = StoreConfig::from_url("file:///x?group_fsync=false").unwrap();
        assert!(matches!(
            c.backend,
            Backend::Fs {
                fsync: true,
                group_fsync: false,
                ..
            }
        ));
        assert!(!c.flushes_grouped(), "per-put flushes when asked for");
        assert!(
            !StoreConfig::from_url("file:///x?fsync=false")
                .unwrap()
                .flushes_grouped()
        );
        assert_eq!(
            StoreConfig::from_url("file:///x")
                .unwrap()
                .flushes_grouped(),
            crate::durable::supported(),
            "grouped by default where the platform makes them durable"
        );
    }

    #[test]
    fn s3_urls() {
        let c = StoreConfig::from_url(
            "s3://veil-blobs/tenant-a?endpoint=http://127.0.0.1:9000&region=eu-west-1\
             &allow_http=true&path_style=true&provider=minio&part_size=16MiB\
             &upload_concurrency=8&max_get_size=64MiB&checksum_algorithm=SHA256",
        )
        .unwrap();
        let s = s3(&c);
        assert_eq!(s.bucket, "veil-blobs");
        assert_eq!(s.provider, "minio");
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.allow_http, Some(true));
        assert_eq!(s.path_style, Some(true));
        assert_eq!(
            s.options.get("checksum_algorithm").map(String::as_str),
            Some("SHA256")
        );
        assert_eq!(c.prefix.as_deref(), Some("tenant-a"));
        assert_eq!(
            (c.part_size, c.upload_concurrency, c.max_get_size),
            (16 << 20, 8, 64 << 20)
        );
        assert_eq!(c.store_id().to_string(), "s3:minio:veil-blobs");

        let plain = StoreConfig::from_url("s3://b").unwrap();
        assert_eq!(s3(&plain).provider, "aws");
        assert_eq!(s3(&plain).path_style, None);
        let vh = StoreConfig::from_url("s3://b?virtual_hosted_style=true").unwrap();
        assert_eq!(s3(&vh).path_style, Some(false));
    }

    #[test]
    fn bad_urls_name_the_field() {
        assert_eq!(field_of(""), "url");
        assert_eq!(field_of("ftp://x"), "url");
        assert_eq!(field_of("s3://"), "bucket");
        assert_eq!(field_of("s3://Bad_Bucket"), "bucket");
        assert_eq!(field_of("s3://b?provider=AWS"), "provider");
        assert_eq!(field_of("s3://b?no_such_option=1"), "s3.no_such_option");
        assert_eq!(field_of("s3://b?part_size=1MiB"), "part_size");
        assert_eq!(field_of("s3://b?part_size=lots"), "part_size");
        assert_eq!(
            field_of("s3://b?upload_concurrency=0"),
            "upload_concurrency"
        );
        assert_eq!(field_of("s3://b?max_get_size=0"), "max_get_size");
        assert_eq!(field_of("s3://b?endpoint=ftp://x"), "s3.endpoint");
        assert_eq!(field_of("s3://b?region=a&region=b"), "region");
        assert_eq!(field_of("s3://b/a?prefix=b"), "prefix");
        assert_eq!(field_of("s3://b/a//b"), "prefix");
        assert_eq!(field_of("s3://b?prefix=../x"), "prefix");
        assert_eq!(
            field_of("s3://b?path_style=true&virtual_hosted_style=true"),
            "path_style"
        );
        assert_eq!(field_of("mem://?endpoint=x"), "endpoint");
        assert_eq!(field_of("gs://"), "bucket");
        assert_eq!(field_of("az://"), "container");
    }

    #[test]
    fn credentials_in_urls_are_refused_without_echoing_them() {
        for url in [
            "s3://b?secret_access_key=TOPSECRET",
            "s3://b?aws_secret_access_key=TOPSECRET",
            "s3://b?access_key_id=TOPSECRET",
            "s3://b?session_token=TOPSECRET",
            "s3://b?endpoint=http://user:TOPSECRET@127.0.0.1:9000",
            "gs://b?service_account_key=TOPSECRET",
            "az://c?account_key=TOPSECRET",
            "az://c?sas_token=TOPSECRET",
            "az://c?client_secret=TOPSECRET",
        ] {
            let err = StoreConfig::from_url(url).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("credentials are not accepted"), "{url}: {msg}");
            assert!(!msg.contains("TOPSECRET"), "{url}: {msg}");
        }
    }

    #[test]
    fn gcs_and_azure_urls() {
        let c = StoreConfig::from_url("gs://veil-gcs/p?service_account_path=/etc/sa.json").unwrap();
        assert_eq!(
            c.backend,
            Backend::Gcs(GcsConfig::new("veil-gcs").with_service_account_path("/etc/sa.json"))
        );
        assert_eq!(c.prefix.as_deref(), Some("p"));
        assert_eq!(c.store_id().to_string(), "gcs:gcp:veil-gcs");

        let c =
            StoreConfig::from_url("az://veil-c?account=acct&use_emulator=true&provider=azurite")
                .unwrap();
        assert_eq!(
            c.backend,
            Backend::Azure(
                AzureConfig::new("veil-c")
                    .with_account("acct")
                    .with_emulator(true)
                    .with_provider("azurite")
            )
        );
        assert_eq!(c.store_id().to_string(), "azure:azurite:veil-c");
    }

    #[test]
    fn cloud_stores_build_without_network() {
        let s3 = StoreConfig::s3(
            S3Config::new("b")
                .with_region("us-east-1")
                .with_endpoint("http://127.0.0.1:1")
                .with_allow_http(true)
                .with_credentials(S3Credentials::new("id", "secret")),
        );
        assert!(s3.build_object_store().unwrap().1.is_some());
        let az = StoreConfig::azure(AzureConfig::new("c").with_emulator(true));
        assert!(az.build_object_store().unwrap().1.is_some());
        let gcs = StoreConfig::gcs(GcsConfig::new("b").with_option("skip_signature", "true"));
        assert!(gcs.build_object_store().unwrap().1.is_some());
        assert!(
            StoreConfig::memory()
                .build_object_store()
                .unwrap()
                .1
                .is_none()
        );
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = S3Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI").with_session_token("tok123");
        let dbg = format!(
            "{:?}",
            StoreConfig::s3(S3Config::new("b").with_credentials(c))
        );
        assert!(dbg.contains("AKIDEXAMPLE"), "{dbg}");
        assert!(
            !dbg.contains("wJalrXUtnFEMI") && !dbg.contains("tok123"),
            "{dbg}"
        );
    }

    #[test]
    fn deserializes_from_json() {
        let c: StoreConfig = serde_json::from_value(serde_json::json!({
            "backend": {
                "type": "s3", "bucket": "veil", "provider": "r2", "region": "auto",
                "endpoint": "https://acct.r2.cloudflarestorage.com",
                "credentials": {"access_key_id": "id", "secret_access_key": "s"}
            },
            "prefix": "v1",
            "part_size": 10485760
        }))
        .unwrap();
        assert_eq!(c.store_id().to_string(), "s3:r2:veil");
        assert_eq!(c.part_size, 10 << 20);
        assert_eq!(c.upload_concurrency, DEFAULT_UPLOAD_CONCURRENCY);
        c.validate().unwrap();

        let fs: StoreConfig =
            serde_json::from_value(serde_json::json!({"backend": {"type": "fs", "root": "/x"}}))
                .unwrap();
        assert_eq!(
            fs.backend,
            Backend::Fs {
                root: "/x".into(),
                bucket: "blobs".into(),
                fsync: true,
                group_fsync: true
            }
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("f", "123").unwrap(), 123);
        assert_eq!(parse_size("f", "64KiB").unwrap(), 65536);
        assert_eq!(parse_size("f", "8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("f", "1 GiB").unwrap(), 1 << 30);
        assert!(parse_size("f", "1TiB").is_err());
        assert!(parse_size("f", "").is_err());
        assert!(parse_size("f", "99999999999999999999G").is_err());
    }
}
