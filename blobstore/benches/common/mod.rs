//! Helpers shared by the blob-store benchmarks.

/// A comma-separated list from environment variable `var`, or `default`.
pub(crate) fn env_list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Parses `64KiB`, `1MiB`, `1GiB`, `512` (bytes).
pub(crate) fn parse_size(s: &str) -> u64 {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("bad size {s:?}"));
    n * match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => panic!("bad size unit in {s:?}"),
    }
}
