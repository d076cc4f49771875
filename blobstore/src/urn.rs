//! Blob URNs (protocol §5): `urn:blob:{version}:{storage_type}:{provider}:{bucket}:{file_name}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Everything a URN starts with.
pub const URN_PREFIX: &str = "urn:blob:";
/// Longest `provider` and `bucket` component, in bytes.
pub const MAX_NAME_LEN: usize = 63;
/// Longest `file_name`, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 1024;
/// Longest `/`-separated segment of a `file_name`, in bytes.
pub const MAX_SEGMENT_LEN: usize = 255;

/// The component of a URN an [`Error::InvalidUrn`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UrnComponent {
    /// The leading `urn:blob:`.
    Prefix,
    /// `v1`.
    Version,
    /// `s3`, `gcs`, `azure`, `fs` or `mem`.
    StorageType,
    /// `[a-z0-9-]{1,63}`.
    Provider,
    /// `[a-z0-9._-]{1,63}`.
    Bucket,
    /// The object path.
    FileName,
}

impl UrnComponent {
    /// The component's name as the spec writes it (`storage_type`, `file_name`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefix => "prefix",
            Self::Version => "version",
            Self::StorageType => "storage_type",
            Self::Provider => "provider",
            Self::Bucket => "bucket",
            Self::FileName => "file_name",
        }
    }
}

impl fmt::Display for UrnComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn invalid(component: UrnComponent, reason: &'static str) -> Error {
    Error::InvalidUrn { component, reason }
}

/// URN format version. Only `v1` exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum UrnVersion {
    /// `v1`
    #[default]
    V1,
}

impl UrnVersion {
    /// `"v1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
        }
    }
}

impl fmt::Display for UrnVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UrnVersion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "v1" => Ok(Self::V1),
            "" => Err(invalid(UrnComponent::Version, "is missing")),
            _ => Err(invalid(
                UrnComponent::Version,
                "is not supported (expected \"v1\")",
            )),
        }
    }
}

/// Kind of storage a blob lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum StorageType {
    /// Amazon S3 or an S3-compatible service (MinIO, R2, …).
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
    /// A directory on the local filesystem.
    Fs,
    /// Process memory (tests, demos).
    Mem,
}

impl StorageType {
    /// Every storage type, in spec order.
    pub const ALL: [StorageType; 5] = [Self::S3, Self::Gcs, Self::Azure, Self::Fs, Self::Mem];

    /// The URN spelling: `s3`, `gcs`, `azure`, `fs` or `mem`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::S3 => "s3",
            Self::Gcs => "gcs",
            Self::Azure => "azure",
            Self::Fs => "fs",
            Self::Mem => "mem",
        }
    }
}

impl fmt::Display for StorageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StorageType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "s3" => Ok(Self::S3),
            "gcs" => Ok(Self::Gcs),
            "azure" => Ok(Self::Azure),
            "fs" => Ok(Self::Fs),
            "mem" => Ok(Self::Mem),
            "" => Err(invalid(UrnComponent::StorageType, "is missing")),
            _ => Err(invalid(
                UrnComponent::StorageType,
                "must be one of s3, gcs, azure, fs, mem",
            )),
        }
    }
}

macro_rules! serde_via_str {
    ($ty:ty, $what:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    };
}

serde_via_str!(UrnVersion, "a blob URN version (\"v1\")");
serde_via_str!(StorageType, "a storage type (s3, gcs, azure, fs or mem)");
serde_via_str!(Urn, "a blob URN (urn:blob:v1:…)");

/// Checks a `provider` component: `[a-z0-9-]{1,63}`.
pub(crate) fn check_provider(s: &str) -> Result<()> {
    check_name(s, UrnComponent::Provider, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
    })
}

/// Checks a `bucket` component: `[a-z0-9._-]{1,63}`.
pub(crate) fn check_bucket(s: &str) -> Result<()> {
    check_name(s, UrnComponent::Bucket, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
    })
}

fn check_name(s: &str, component: UrnComponent, allowed: impl Fn(u8) -> bool) -> Result<()> {
    if s.is_empty() {
        return Err(invalid(component, "is missing"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(invalid(component, "is longer than 63 characters"));
    }
    if !s.bytes().all(allowed) {
        return Err(invalid(
            component,
            match component {
                UrnComponent::Provider => "may only contain a-z, 0-9 and '-'",
                _ => "may only contain a-z, 0-9, '.', '_' and '-'",
            },
        ));
    }
    Ok(())
}

/// Checks an object path: `/`-separated segments of `[A-Za-z0-9._-]{1,255}`, none `.` or `..`,
/// 1024 bytes at most. Used for URN file names and for store prefixes.
pub(crate) fn check_file_name(s: &str) -> Result<()> {
    const C: UrnComponent = UrnComponent::FileName;
    if s.is_empty() {
        return Err(invalid(C, "is missing"));
    }
    if s.len() > MAX_FILE_NAME_LEN {
        return Err(invalid(C, "is longer than 1024 bytes"));
    }
    for segment in s.split('/') {
        if segment.is_empty() {
            return Err(invalid(C, "has an empty path segment"));
        }
        if segment.len() > MAX_SEGMENT_LEN {
            return Err(invalid(C, "has a path segment longer than 255 bytes"));
        }
        if segment == "." || segment == ".." {
            return Err(invalid(C, "has a '.' or '..' path segment"));
        }
        if !segment
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                C,
                "may only contain A-Z, a-z, 0-9, '.', '_', '-' and '/' between segments",
            ));
        }
    }
    Ok(())
}

/// A blob URN: where a blob is. (The blob's SHA-256 hash says what it must be.)
///
/// ```
/// use veil_blobstore::{StorageType, Urn};
///
/// let urn: Urn = "urn:blob:v1:s3:minio:veil-blobs:prompts/p-1.veil".parse()?;
/// assert_eq!(urn.storage_type(), StorageType::S3);
/// assert_eq!(urn.provider(), "minio");
/// assert_eq!(urn.bucket(), "veil-blobs");
/// assert_eq!(urn.file_name(), "prompts/p-1.veil");
/// assert_eq!(urn.to_string(), "urn:blob:v1:s3:minio:veil-blobs:prompts/p-1.veil");
///
/// let err = "urn:blob:v1:s3:MinIO:veil-blobs:x".parse::<Urn>().unwrap_err();
/// assert_eq!(err.to_string(), "invalid blob URN: provider may only contain a-z, 0-9 and '-'");
/// # Ok::<(), veil_blobstore::Error>(())
/// ```
///
/// Parsing accepts exactly the strings [`Display`](fmt::Display) produces, so parse-then-format and
/// format-then-parse both round-trip. Serde uses the string form.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Urn {
    /// The whole URN; the components are slices of it (one allocation, a small value).
    text: Box<str>,
    version: UrnVersion,
    storage_type: StorageType,
    /// Where `provider`, `bucket` and `file_name` start in `text` (a URN is < 1200 bytes).
    provider_at: u16,
    bucket_at: u16,
    file_name_at: u16,
}

impl Urn {
    /// A v1 URN from its components, each checked against protocol §5.
    pub fn new(
        storage_type: StorageType,
        provider: impl Into<String>,
        bucket: impl Into<String>,
        file_name: impl Into<String>,
    ) -> Result<Self> {
        let (provider, bucket, file_name) = (provider.into(), bucket.into(), file_name.into());
        check_provider(&provider)?;
        check_bucket(&bucket)?;
        check_file_name(&file_name)?;
        Ok(Self::assemble(
            UrnVersion::V1,
            storage_type,
            &provider,
            &bucket,
            &file_name,
        ))
    }

    /// Builds the value from components that were already checked.
    fn assemble(
        version: UrnVersion,
        storage_type: StorageType,
        provider: &str,
        bucket: &str,
        file_name: &str,
    ) -> Self {
        let head = format!("{URN_PREFIX}{version}:{storage_type}:");
        let provider_at = head.len();
        let bucket_at = provider_at + provider.len() + 1;
        let file_name_at = bucket_at + bucket.len() + 1;
        let text = format!("{head}{provider}:{bucket}:{file_name}");
        // Checked components bound the length: 9 + 3 + 6 + 64 + 64 + 1024 < u16::MAX.
        let at = |n: usize| u16::try_from(n).expect("a checked URN is shorter than 64 KiB");
        Self {
            text: text.into_boxed_str(),
            version,
            storage_type,
            provider_at: at(provider_at),
            bucket_at: at(bucket_at),
            file_name_at: at(file_name_at),
        }
    }

    /// The URN as a string (the same as its `Display` form).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A URN from a [`UrnParts`] view (e.g. one deserialized from JSON), checked.
    pub fn from_parts(parts: UrnParts) -> Result<Self> {
        let UrnParts {
            version,
            storage_type,
            provider,
            bucket,
            file_name,
        } = parts;
        check_provider(&provider)?;
        check_bucket(&bucket)?;
        check_file_name(&file_name)?;
        Ok(Self::assemble(
            version,
            storage_type,
            &provider,
            &bucket,
            &file_name,
        ))
    }

    /// The URN format version (always `v1` today).
    pub fn version(&self) -> UrnVersion {
        self.version
    }

    /// Kind of storage.
    pub fn storage_type(&self) -> StorageType {
        self.storage_type
    }

    /// Provider name (`aws`, `minio`, `r2`, `local`, …).
    pub fn provider(&self) -> &str {
        &self.text[usize::from(self.provider_at)..usize::from(self.bucket_at) - 1]
    }

    /// Bucket (or container) name.
    pub fn bucket(&self) -> &str {
        &self.text[usize::from(self.bucket_at)..usize::from(self.file_name_at) - 1]
    }

    /// Object path inside the bucket.
    pub fn file_name(&self) -> &str {
        &self.text[usize::from(self.file_name_at)..]
    }

    /// The components as a plain struct; serializes as
    /// `{"version","storage_type","provider","bucket","file_name"}`.
    pub fn parts(&self) -> UrnParts {
        UrnParts {
            version: self.version,
            storage_type: self.storage_type,
            provider: self.provider().to_owned(),
            bucket: self.bucket().to_owned(),
            file_name: self.file_name().to_owned(),
        }
    }
}

impl FromStr for Urn {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix(URN_PREFIX)
            .ok_or_else(|| invalid(UrnComponent::Prefix, "must be \"urn:blob:\""))?;
        // `file_name` is "the rest of the string": at most 5 pieces, the last one unsplit.
        let mut pieces = rest.splitn(5, ':');
        let mut next = |component| {
            pieces
                .next()
                .ok_or_else(|| invalid(component, "is missing"))
        };
        let version: UrnVersion = next(UrnComponent::Version)?.parse()?;
        let storage_type: StorageType = next(UrnComponent::StorageType)?.parse()?;
        let provider = next(UrnComponent::Provider)?;
        check_provider(provider)?;
        let bucket = next(UrnComponent::Bucket)?;
        check_bucket(bucket)?;
        let file_name = next(UrnComponent::FileName)?;
        check_file_name(file_name)?;
        Ok(Self::assemble(
            version,
            storage_type,
            provider,
            bucket,
            file_name,
        ))
    }
}

impl AsRef<str> for Urn {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl TryFrom<&str> for Urn {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self> {
        s.parse()
    }
}

impl TryFrom<UrnParts> for Urn {
    type Error = Error;

    fn try_from(parts: UrnParts) -> Result<Self> {
        Self::from_parts(parts)
    }
}

impl fmt::Display for Urn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Urn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Urn({self})")
    }
}

/// The components of a [`Urn`], as plain fields.
///
/// Serializes as `{"version":"v1","storage_type":"s3","provider":"…","bucket":"…","file_name":"…"}`.
/// Build a checked [`Urn`] back from it with [`Urn::from_parts`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrnParts {
    /// `v1`.
    pub version: UrnVersion,
    /// Kind of storage.
    pub storage_type: StorageType,
    /// Provider name.
    pub provider: String,
    /// Bucket name.
    pub bucket: String,
    /// Object path.
    pub file_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn component_of(s: &str) -> UrnComponent {
        match s.parse::<Urn>() {
            Err(Error::InvalidUrn { component, .. }) => component,
            other => panic!("{s:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn parses_and_formats_a_typical_urn() {
        let s = "urn:blob:v1:fs:local:blobs:0197a3c4-7d1e-7c2a-9f00-1234567890ab/session/prompt-0197a3c4-7d1e-7c2a-9f00-1234567890ac.veil";
        let urn: Urn = s.parse().unwrap();
        assert_eq!(urn.version(), UrnVersion::V1);
        assert_eq!(urn.storage_type(), StorageType::Fs);
        assert_eq!(urn.provider(), "local");
        assert_eq!(urn.bucket(), "blobs");
        assert!(urn.file_name().ends_with("ac.veil"));
        assert_eq!(urn.to_string(), s);
        assert_eq!(format!("{urn:?}"), format!("Urn({s})"));
        assert_eq!(urn.as_str(), s);
        assert!(std::mem::size_of::<Urn>() <= 32);
    }

    #[test]
    fn every_storage_type_round_trips() {
        for st in StorageType::ALL {
            let urn = Urn::new(st, "p", "b", "f").unwrap();
            let s = urn.to_string();
            assert_eq!(s, format!("urn:blob:v1:{st}:p:b:f"));
            assert_eq!(s.parse::<Urn>().unwrap(), urn);
            assert_eq!(st.as_str().parse::<StorageType>().unwrap(), st);
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let name63 = "a".repeat(63);
        let seg255 = "s".repeat(255);
        let file1024 = format!(
            "{seg255}/{seg255}/{seg255}/{}/{}",
            "t".repeat(127),
            "u".repeat(128)
        );
        assert_eq!(file1024.len(), 1024);
        let urn = Urn::new(StorageType::S3, &*name63, &*name63, &*file1024).unwrap();
        assert_eq!(urn.to_string().parse::<Urn>().unwrap(), urn);

        let name64 = "a".repeat(64);
        assert!(Urn::new(StorageType::S3, &*name64, "b", "f").is_err());
        assert!(Urn::new(StorageType::S3, "p", &*name64, "f").is_err());
        assert!(Urn::new(StorageType::S3, "p", "b", format!("{file1024}x")).is_err());
        assert!(Urn::new(StorageType::S3, "p", "b", "s".repeat(256)).is_err());
    }

    #[test]
    fn errors_name_the_component_at_fault() {
        let cases: &[(&str, UrnComponent)] = &[
            ("", UrnComponent::Prefix),
            ("urn:blob", UrnComponent::Prefix),
            ("URN:blob:v1:s3:aws:b:f", UrnComponent::Prefix),
            ("urn:BLOB:v1:s3:aws:b:f", UrnComponent::Prefix),
            ("urn:blob:", UrnComponent::Version),
            ("urn:blob:v2:s3:aws:b:f", UrnComponent::Version),
            ("urn:blob:V1:s3:aws:b:f", UrnComponent::Version),
            ("urn:blob:v1", UrnComponent::StorageType),
            ("urn:blob:v1:", UrnComponent::StorageType),
            ("urn:blob:v1:S3:aws:b:f", UrnComponent::StorageType),
            ("urn:blob:v1:gs:aws:b:f", UrnComponent::StorageType),
            ("urn:blob:v1:s3", UrnComponent::Provider),
            ("urn:blob:v1:s3::b:f", UrnComponent::Provider),
            ("urn:blob:v1:s3:AWS:b:f", UrnComponent::Provider),
            ("urn:blob:v1:s3:a_b:b:f", UrnComponent::Provider),
            ("urn:blob:v1:s3:a.b:b:f", UrnComponent::Provider),
            ("urn:blob:v1:s3:aws", UrnComponent::Bucket),
            ("urn:blob:v1:s3:aws::f", UrnComponent::Bucket),
            ("urn:blob:v1:s3:aws:B:f", UrnComponent::Bucket),
            ("urn:blob:v1:s3:aws:b/c:f", UrnComponent::Bucket),
            ("urn:blob:v1:s3:aws:b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a:b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:/a", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a/", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a//b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a/./b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:../b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:..", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a\\b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:a%20b", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:caf\u{e9}", UrnComponent::FileName),
            ("urn:blob:v1:s3:aws:b:f\n", UrnComponent::FileName),
        ];
        for (s, component) in cases {
            assert_eq!(component_of(s), *component, "{s:?}");
        }
        // "..." and ".x" are ordinary names, only "." and ".." are special.
        for ok in [
            "urn:blob:v1:s3:aws:b:.../.x/x.",
            "urn:blob:v1:mem:local:mem:A-Z_0.9",
        ] {
            assert_eq!(ok.parse::<Urn>().unwrap().to_string(), ok);
        }
    }

    #[test]
    fn error_messages_name_the_component_and_not_the_input() {
        let err = "urn:blob:v1:s3:aws:b:secret plaintext here"
            .parse::<Urn>()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("file_name"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        assert_eq!(err.kind_code(), "invalid_urn");
    }

    #[test]
    fn serde_uses_the_string_form() {
        let urn: Urn = "urn:blob:v1:s3:minio:veil:a/b.veil".parse().unwrap();
        let json = serde_json::to_string(&urn).unwrap();
        assert_eq!(json, "\"urn:blob:v1:s3:minio:veil:a/b.veil\"");
        assert_eq!(serde_json::from_str::<Urn>(&json).unwrap(), urn);
        let bad = serde_json::from_str::<Urn>("\"urn:blob:v1:s3:minio:veil:a//b\"").unwrap_err();
        assert!(bad.to_string().contains("file_name"), "{bad}");
        assert!(serde_json::from_str::<Urn>("42").is_err());
    }

    #[test]
    fn parts_serialize_as_the_interop_json() {
        let urn: Urn = "urn:blob:v1:gcs:gcp:bkt:x/y".parse().unwrap();
        let json = serde_json::to_value(urn.parts()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": "v1", "storage_type": "gcs", "provider": "gcp",
                "bucket": "bkt", "file_name": "x/y"
            })
        );
        let back: UrnParts = serde_json::from_value(json).unwrap();
        assert_eq!(Urn::from_parts(back).unwrap(), urn);
        let mut bad = urn.parts();
        bad.bucket = "Bad".into();
        assert!(matches!(
            Urn::try_from(bad),
            Err(Error::InvalidUrn {
                component: UrnComponent::Bucket,
                ..
            })
        ));
    }

    fn arb_urn() -> impl Strategy<Value = Urn> {
        let segment = "[A-Za-z0-9._-]{1,40}".prop_filter("not . or ..", |s| s != "." && s != "..");
        (
            proptest::sample::select(StorageType::ALL.to_vec()),
            "[a-z0-9-]{1,63}",
            "[a-z0-9._-]{1,63}",
            proptest::collection::vec(segment, 1..8),
        )
            .prop_map(|(st, provider, bucket, segments)| {
                Urn::new(st, provider, bucket, segments.join("/")).unwrap()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn format_then_parse_round_trips(urn in arb_urn()) {
            let s = urn.to_string();
            let back: Urn = s.parse().unwrap();
            prop_assert_eq!(&back, &urn);
            prop_assert_eq!(back.to_string(), s);
            let json = serde_json::to_string(&urn).unwrap();
            prop_assert_eq!(serde_json::from_str::<Urn>(&json).unwrap(), urn);
        }

        #[test]
        fn arbitrary_strings_never_panic_and_accepted_ones_round_trip(s in any::<String>()) {
            if let Ok(urn) = s.parse::<Urn>() {
                prop_assert_eq!(urn.to_string(), s);
            }
        }

        #[test]
        fn near_miss_strings_never_panic_and_accepted_ones_round_trip(
            s in "urn:blob:(v1|v2|)(:(s3|gcs|azure|fs|mem|x|))?(:[a-z0-9A-Z._/:-]{0,12}){0,4}"
        ) {
            if let Ok(urn) = s.parse::<Urn>() {
                prop_assert_eq!(urn.to_string(), s);
            }
        }
    }
}
