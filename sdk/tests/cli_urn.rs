//! `veil urn parse` end to end.

mod common;

use common::{fails, ok_line};
use serde_json::json;

#[test]
fn valid_urns_print_their_parts() {
    let long_segment = "a".repeat(255);
    let long_name = "b".repeat(63);
    let cases = [
        (
            "urn:blob:v1:s3:aws:veil-blobs:sessions/0190b5d4/prompt.blob".to_string(),
            json!({"version":"v1","storage_type":"s3","provider":"aws","bucket":"veil-blobs",
                   "file_name":"sessions/0190b5d4/prompt.blob"}),
        ),
        (
            "urn:blob:v1:gcs:google:b.u_c-k3t:X".to_string(),
            json!({"version":"v1","storage_type":"gcs","provider":"google","bucket":"b.u_c-k3t","file_name":"X"}),
        ),
        (
            "urn:blob:v1:azure:r2-eu:c:A.b_C-d/..x/x..".to_string(),
            json!({"version":"v1","storage_type":"azure","provider":"r2-eu","bucket":"c","file_name":"A.b_C-d/..x/x.."}),
        ),
        (
            format!("urn:blob:v1:fs:local:{long_name}:{long_segment}/{long_segment}"),
            json!({"version":"v1","storage_type":"fs","provider":"local","bucket":long_name,
                   "file_name":format!("{long_segment}/{long_segment}")}),
        ),
        (
            "urn:blob:v1:mem:0:1:2".to_string(),
            json!({"version":"v1","storage_type":"mem","provider":"0","bucket":"1","file_name":"2"}),
        ),
    ];
    for (urn, expected) in cases {
        let line = ok_line(&["urn", "parse", &urn], b"");
        // Exactly these keys, in the order of the URN.
        let keys: Vec<String> =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&line)
                .unwrap()
                .keys()
                .cloned()
                .collect();
        assert_eq!(keys.len(), 5, "{line}");
        let got: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(got, expected, "{urn}");
        // Formatting the parts gives back the input.
        let rebuilt = format!(
            "urn:blob:{}:{}:{}:{}:{}",
            got["version"].as_str().unwrap(),
            got["storage_type"].as_str().unwrap(),
            got["provider"].as_str().unwrap(),
            got["bucket"].as_str().unwrap(),
            got["file_name"].as_str().unwrap()
        );
        assert_eq!(rebuilt, urn);
    }
}

#[test]
fn invalid_urns_fail_naming_the_component() {
    let too_long_name = "a".repeat(64);
    let too_long_segment = "a".repeat(256);
    let too_long_file = vec!["abcdefgh"; 114].join("/"); // 1025 bytes
    assert_eq!(too_long_file.len(), 1025);
    let cases = [
        ("".to_string(), "prefix"),
        ("urn:blob".to_string(), "prefix"),
        ("URN:BLOB:v1:s3:aws:b:f".to_string(), "prefix"),
        ("urn:blob:".to_string(), "version"),
        ("urn:blob:v2:s3:aws:b:f".to_string(), "version"),
        ("urn:blob:V1:s3:aws:b:f".to_string(), "version"),
        ("urn:blob:v1".to_string(), "storage_type"),
        ("urn:blob:v1:ftp:aws:b:f".to_string(), "storage_type"),
        ("urn:blob:v1:S3:aws:b:f".to_string(), "storage_type"),
        ("urn:blob:v1:s3".to_string(), "provider"),
        ("urn:blob:v1:s3::b:f".to_string(), "provider"),
        ("urn:blob:v1:s3:AWS:b:f".to_string(), "provider"),
        ("urn:blob:v1:s3:a_b:b:f".to_string(), "provider"),
        (format!("urn:blob:v1:s3:{too_long_name}:b:f"), "provider"),
        ("urn:blob:v1:s3:aws".to_string(), "bucket"),
        ("urn:blob:v1:s3:aws::f".to_string(), "bucket"),
        ("urn:blob:v1:s3:aws:Bucket:f".to_string(), "bucket"),
        (format!("urn:blob:v1:s3:aws:{too_long_name}:f"), "bucket"),
        ("urn:blob:v1:s3:aws:b".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:a//b".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:/a".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:a/".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:a/../b".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:.".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:a:b".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:a b".to_string(), "file_name"),
        ("urn:blob:v1:s3:aws:b:é".to_string(), "file_name"),
        (
            format!("urn:blob:v1:s3:aws:b:{too_long_segment}"),
            "file_name",
        ),
        (format!("urn:blob:v1:s3:aws:b:{too_long_file}"), "file_name"),
    ];
    for (urn, component) in cases {
        let line = fails(&["urn", "parse", &urn], b"", 1);
        let message = line
            .strip_prefix("veil: error: URN: ")
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            message.contains(&format!(" {component} ")),
            "{urn:?}: expected the error to name {component}, got: {message}"
        );
    }
}

#[test]
fn urn_parse_needs_exactly_one_urn() {
    let line = fails(&["urn", "parse"], b"", 2);
    assert!(line.contains("<URN>"), "{line}");
    let line = fails(&["urn", "parse", "urn:blob:v1:s3:aws:b:f", "extra"], b"", 2);
    assert!(line.contains("unexpected"), "{line}");
}
